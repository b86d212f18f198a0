"""caked's Prometheus endpoint (--metrics-listen) scraped by real HTTP clients (curl and
urllib) and read by Prometheus' own text parser (prometheus_client): latency histograms per
request type whose counts follow the requests made, 404/405 for anything but GET /metrics,
a slow HTTP client that never finishes its request does not stall the engines, and a bad
address is refused at startup with the reason. Needs CAKE_LIB and CAKED_BIN."""
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "client", "python"))
import caked  # noqa: E402


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams, family, name, **labels):
    return [s.value for s in fams[family].samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


class MetricsOverHttp(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="caked-http-")
        cls.sock = os.path.join(cls.dir, "caked.sock")
        cls.log = open(os.path.join(cls.dir, "log"), "w+")
        # port 0: the kernel picks a free one; caked logs the address it bound
        cls.proc = subprocess.Popen([os.environ["CAKED_BIN"], "--socket", cls.sock,
                                     "--host-pool", "64M", "--workers", "2",
                                     "--metrics-listen", "127.0.0.1:0"],
                                    stderr=cls.log)
        cls.url = None
        for _ in range(500):
            cls.log.seek(0)
            m = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", cls.log.read())
            if m and os.path.exists(cls.sock):
                cls.url = m.group(1)
                break
            time.sleep(0.02)
        assert cls.url, "caked did not report its metrics address"

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        assert cls.proc.wait(10) == 0
        cls.log.close()
        shutil.rmtree(cls.dir)

    def scrape(self):
        with urllib.request.urlopen(self.url, timeout=10) as r:
            self.assertEqual(r.status, 200)
            self.assertTrue(r.headers["Content-Type"].startswith("text/plain; version=0.0.4"))
            return r.read().decode()

    def test_histograms_per_request_type_follow_the_requests(self):
        before = families(self.scrape())
        pings0 = (samples(before, "caked_request_duration_seconds",
                          "caked_request_duration_seconds_count", type="ping") or [0])[0]
        work = "caked_work_seconds"
        work0 = {(s.labels["kind"], s.labels["stage"]): s.value for s in before[work].samples
                 if s.name == work + "_count"}
        dec = "caked_decode_evictions"
        dec0 = {s.labels["by"]: s.value for s in before[dec].samples}
        L, H, Hkv, D, n = 2, 4, 2, 32, 256
        with caked.Client(self.sock, service="http-metrics") as c:
            for _ in range(7):
                c.ping()
            s = c.open_sequence(L, H, Hkv, D, n, dtype="f32", cache_size=64, window=8,
                                max_new_tokens=8)
            for layer in range(L):
                s.reserve(layer)
                s.observe(layer)
            evicting = 0  # steps after the first (which only reserves the new token's slot)
            for i in range(3):  # that find a layer over its budget: a worker evicts
                evicting += i > 0 and any(s.tokens(x) > s.budget(x) for x in range(L))
                s.decode_step()
            s.close()
            # curl: a real HTTP client other than Python's (while the engine is attached:
            # a tenant made for a service lasts as long as its clients)
            text = subprocess.run(["curl", "-sSf", "--max-time", "10", self.url], check=True,
                                  capture_output=True, text=True).stdout
        fams = families(text)
        hist = "caked_request_duration_seconds"
        self.assertEqual(fams[hist].type, "histogram")
        count = lambda t: samples(fams, hist, hist + "_count", type=t)[0]  # noqa: E731
        self.assertEqual(count("ping") - pings0, 7)
        self.assertEqual(count("seq_open"), 1)
        self.assertEqual(count("prefill_reserve"), L)
        self.assertEqual(count("prefill_observe"), L)
        self.assertEqual(count("decode_step"), 3)
        self.assertEqual(count("seq_close"), 1)
        for t in ("ping", "prefill_observe", "decode_step"):
            buckets = [(s.labels["le"], s.value) for s in fams[hist].samples
                       if s.name == hist + "_bucket" and s.labels["type"] == t]
            values = [v for _, v in buckets]
            self.assertEqual(values, sorted(values), "cumulative buckets never decrease")
            self.assertEqual(buckets[-1], ("+Inf", count(t)))
            self.assertGreater(samples(fams, hist, hist + "_sum", type=t)[0], 0)
        # the workers' jobs: a prefill job per observed layer, a decode job per step that
        # evicted, each through its three stages
        self.assertEqual(fams[work].type, "histogram")
        self.assertGreaterEqual(evicting, 2)
        for kind, jobs in (("prefill", L), ("decode", evicting), ("pressure", 0)):
            for stage in ("queued", "run", "return"):
                n_ = samples(fams, work, work + "_count", kind=kind, stage=stage)[0]
                self.assertEqual(n_ - work0[(kind, stage)], jobs, (kind, stage))
                buckets = [s.value for s in fams[work].samples if s.name == work + "_bucket"
                           and s.labels["kind"] == kind and s.labels["stage"] == stage]
                self.assertEqual(buckets, sorted(buckets))
                self.assertEqual(buckets[-1], n_)
        self.assertGreater(samples(fams, work, work + "_sum", kind="prefill", stage="run")[0], 0)
        # a host sequence's decode evictions run on a worker, never launched by the loop
        self.assertEqual(fams[dec].type, "counter")
        self.assertEqual(samples(fams, dec, dec + "_total", by="worker")[0] - dec0["worker"], evicting)
        self.assertEqual(samples(fams, dec, dec + "_total", by="loop")[0] - dec0["loop"], 0)
        # nothing waits or runs now (the engine's calls all returned)
        for g in ("caked_work_queued", "caked_work_running"):
            self.assertEqual(fams[g].type, "gauge")
            self.assertEqual(samples(fams, g, g), [0.0], g)
        g = "caked_work_oldest_seconds"
        self.assertEqual(fams[g].type, "gauge")
        for state in ("running", "queued"):
            self.assertEqual(samples(fams, g, g, state=state), [0.0], state)
        # the other families parse and agree with the requests made
        reqs = samples(fams, "caked_requests", "caked_requests_total", type="decode_step")
        self.assertEqual(reqs, [3.0])
        self.assertIn("caked_pool_bytes", fams)
        tenants = {s.labels["tenant"] for s in fams["caked_tenant_used_bytes"].samples}
        self.assertIn("http-metrics", tenants, "the scrape sees every tenant")

    def test_only_get_metrics_and_healthz_are_served(self):
        base = self.url.rsplit("/", 1)[0]
        with urllib.request.urlopen(base + "/healthz", timeout=10) as r:  # liveness
            self.assertEqual((r.status, r.read()), (200, b"ok\n"))
        for path in ("/", "/metrics/x", "/other"):
            with self.assertRaises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + path, timeout=10)
            self.assertEqual(e.exception.code, 404, path)
        req = urllib.request.Request(self.url, data=b"x=1", method="POST")
        with self.assertRaises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        self.assertEqual(e.exception.code, 405)
        self.assertIn("GET", e.exception.headers["Allow"])
        r = urllib.request.urlopen(urllib.request.Request(self.url, method="HEAD"), timeout=10)
        self.assertEqual(r.status, 200)

    def test_a_stalled_scraper_does_not_stall_the_engines(self):
        host, port = re.match(r"http://([\d.]+):(\d+)/", self.url).groups()
        stalled = [socket.create_connection((host, int(port))) for _ in range(4)]
        for s in stalled:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        try:
            with caked.Client(self.sock, service="http-stall") as c:
                t = time.monotonic()
                for _ in range(50):
                    c.ping()
                self.assertLess(time.monotonic() - t, 5.0)
            self.assertIn("caked_pool_bytes", self.scrape(), "others are still served")
        finally:
            for s in stalled:
                s.close()

    def test_a_bad_address_is_refused_with_the_reason(self):
        for bad in ("nonsense", "1.2.3.4:99999", "::1:80"):
            r = subprocess.run([os.environ["CAKED_BIN"], "--socket",
                                os.path.join(self.dir, "x.sock"), "--metrics-listen", bad],
                               capture_output=True, text=True, timeout=10)
            self.assertEqual(r.returncode, 2, bad)
            self.assertIn("metrics-listen", r.stderr)
        # an address in use: caked does not start, and says so
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        r = subprocess.run([os.environ["CAKED_BIN"], "--socket", os.path.join(self.dir, "y.sock"),
                            "--host-pool", "16M", "--metrics-listen",
                            "127.0.0.1:%d" % busy.getsockname()[1]],
                           capture_output=True, text=True, timeout=10)
        busy.close()
        self.assertEqual(r.returncode, 1)
        self.assertIn("Address already in use", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "y.sock")))


if __name__ == "__main__":
    unittest.main()
