// ctx-switch.cu - what the switch between two processes' CUDA contexts costs on this GPU, the
// cost behind a request to caked that follows the engine's own GPU work. Not built by CMake:
//   nvcc -O2 -arch=sm_90a -o ctx-switch tools/ctx-switch.cu
//   ./ctx-switch REG STREAMS ENGINE
// A forked "engine" process copies 64 MiB on the GPU (ENGINE 1; 0: nothing) and syncs, then
// wakes the "daemon" process over a pipe, 60 times; the daemon - with REG x 256 MiB of host
// memory registered and STREAMS streams, as caked has - times its CUDA calls after each wake:
// a 16 KiB host-to-device copy, a launch, a copy, a launch, and how long until that work is
// done (the last 50 wakes' means). docs/benchmarks.md (2026-12-07, fourteenth session) has
// its figures on an H100: with ENGINE 1 the work is done 138-148 us after it is issued, with
// ENGINE 0 in ~6 us - the context switch.
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>
static double now() { timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
__global__ void empty(int *p) { if (p && threadIdx.x == 9999) *p = 1; }
int main(int argc, char **argv) {
  int reg = argc > 1 ? atoi(argv[1]) : 0, streams = argc > 2 ? atoi(argv[2]) : 1, engine = argc > 3 ? atoi(argv[3]) : 1;
  int to_d[2], to_e[2]; pipe(to_d); pipe(to_e);
  pid_t p = fork();
  if (p == 0) { // the engine
    void *a, *b; cudaMalloc(&a, 64 << 20); cudaMalloc(&b, 64 << 20);
    char x = 0;
    for (int i = 0; i < 60; i++) {
      if (engine) cudaMemcpyAsync(b, a, 64 << 20, cudaMemcpyDeviceToDevice, 0);
      cudaStreamSynchronize(0);
      write(to_d[1], &x, 1); read(to_e[0], &x, 1);
    }
    _exit(0);
  }
  cudaFree(0);
  char *hp = nullptr;
  if (reg) { hp = (char *)aligned_alloc(1 << 21, (size_t)reg << 28); for (int s = 0; s < reg; s++) cudaHostRegister(hp + ((size_t)s << 28), 1 << 28, 0); }
  cudaStream_t st[256]; for (int i = 0; i < streams; i++) cudaStreamCreateWithFlags(&st[i], cudaStreamNonBlocking);
  void *h, *d; cudaMallocHost(&h, 1 << 20); cudaMalloc(&d, 1 << 20);
  cudaEvent_t ev; cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
  double s[5] = {0}; char x;
  for (int i = 0; i < 60; i++) {
    read(to_d[0], &x, 1);
    double a = now(); cudaMemcpyAsync(d, h, 16384, cudaMemcpyHostToDevice, st[0]);
    double b = now(); empty<<<1, 32, 0, st[0]>>>(nullptr);
    double c = now(); cudaMemcpyAsync(d, h, 16384, cudaMemcpyHostToDevice, st[0]);
    double e = now(); empty<<<1, 32, 0, st[0]>>>(nullptr);
    double f = now(); cudaEventRecord(ev, st[0]); while (cudaEventQuery(ev) == cudaErrorNotReady) ;
    double g = now();
    if (i >= 10) s[0] += b - a, s[1] += c - b, s[2] += e - c, s[3] += f - e, s[4] += g - f;
    write(to_e[1], &x, 1);
  }
  waitpid(p, nullptr, 0);
  printf("registered %d x 256 MiB, %d streams, engine %s: first H2D %.1f us, launch %.1f, H2D %.1f, launch %.1f, until done %.1f us\n",
         reg, streams, engine ? "copies 64 MiB" : "idle", s[0] / 50, s[1] / 50, s[2] / 50, s[3] / 50, s[4] / 50);
  return 0;
}
