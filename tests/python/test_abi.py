"""The Python binding's copies of cake.h (the cake_layout and cake_policy structs, the enums
it names by string, the error codes it maps to exceptions) against cake.h itself, compiled:
a C program prints what the compiler makes of the header, and every copy must agree. Needs
a C compiler (CC, else cc); the package is imported from client/python."""
import ctypes
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "client", "python"))
import caked  # noqa: E402

INCLUDE = os.path.join(HERE, "..", "..", "client", "include")

LAYOUT = ["layers", "q_heads", "kv_heads", "head_dim", "dtype", "placement", "gpu", "reserved"]
POLICY = ["mode", "cache_size", "window", "tau1", "tau2", "gamma", "cascading", "decode_slack",
          "kind", "alloc", "indicator", "pool", "pool_kernel", "decode", "sinks",
          "pyramid_beta", "ada_alpha", "run_width", "reserved"]
ENUMS = {  # Python name -> C constant
    "policy:cake": "CAKE_POLICY_CAKE", "policy:full": "CAKE_POLICY_FULL",
    "policy:streamingllm": "CAKE_POLICY_STREAMINGLLM", "policy:h2o": "CAKE_POLICY_H2O",
    "policy:tova": "CAKE_POLICY_TOVA", "policy:snapkv": "CAKE_POLICY_SNAPKV",
    "policy:pyramidkv": "CAKE_POLICY_PYRAMIDKV", "policy:adakv": "CAKE_POLICY_ADAKV",
    "alloc:preference": "CAKE_ALLOC_PREFERENCE", "alloc:uniform": "CAKE_ALLOC_UNIFORM",
    "alloc:pyramid": "CAKE_ALLOC_PYRAMID", "alloc:none": "CAKE_ALLOC_NONE",
    "indicator:mean+var": "CAKE_IND_MEAN_VAR", "indicator:mean": "CAKE_IND_MEAN",
    "indicator:var": "CAKE_IND_VAR", "indicator:last": "CAKE_IND_LAST",
    "indicator:position": "CAKE_IND_POSITION",
    "pool:avg": "CAKE_POOL_AVG", "pool:max": "CAKE_POOL_MAX", "pool:none": "CAKE_POOL_NONE",
    "decode:evict": "CAKE_DECODE_EVICT", "decode:prefill-only": "CAKE_DECODE_PREFILL_ONLY",
    "dtype:f32": "CAKE_F32", "dtype:f16": "CAKE_F16", "dtype:bf16": "CAKE_BF16",
}
ERRORS = ["CAKE_EPROTO", "CAKE_EVERSION", "CAKE_EOOM", "CAKE_ENOSEQ", "CAKE_EINVAL",
          "CAKE_EPERM", "CAKE_ESHUTDOWN", "CAKE_ETOOBIG", "CAKE_ESTATE", "CAKE_EINTERNAL",
          "CAKE_ENOTCONN"]


def compiled():
    """What the C compiler makes of cake.h: {name: value}."""
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include \"cake/cake.h\"",
             "int main(void) {"]
    out = lambda name, expr: lines.append(f'printf("{name} %lld\\n", (long long)({expr}));')
    out("sizeof:layout", "sizeof(struct cake_layout)")
    out("sizeof:policy", "sizeof(struct cake_policy)")
    for f in LAYOUT:
        out(f"layout:{f}", f"offsetof(struct cake_layout, {f})")
    for f in POLICY:
        out(f"policy.{f}", f"offsetof(struct cake_policy, {f})")
    for py, c in ENUMS.items():
        out(py, c)
    for c in ERRORS:
        out(c, c)
    lines.append("return 0; }")
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "abi.c"), os.path.join(d, "abi")
        with open(src, "w") as f:
            f.write("\n".join(lines))
        subprocess.run([os.environ.get("CC", "cc"), "-I", INCLUDE, src, "-o", exe], check=True)
        text = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (l.split() for l in text.splitlines())}


class Abi(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.c = compiled()

    def test_structs(self):
        for cls, prefix, fields, size in ((caked._Layout, "layout:", LAYOUT, "sizeof:layout"),
                                          (caked._Policy, "policy.", POLICY, "sizeof:policy")):
            self.assertEqual(ctypes.sizeof(cls), self.c[size], cls.__name__)
            self.assertEqual([f[0] for f in cls._fields_], fields, cls.__name__)
            for f in fields:
                self.assertEqual(getattr(cls, f).offset, self.c[prefix + f], f"{cls.__name__}.{f}")

    def test_enums(self):
        tables = {"policy": {n: i for i, n in enumerate(caked.POLICIES)},
                  "alloc": caked._ALLOCS, "indicator": caked._INDICATORS, "pool": caked._POOLS,
                  "decode": caked._DECODES, "dtype": {k: v[0] for k, v in caked._DTYPES.items()}}
        for py, c in ENUMS.items():
            kind, name = py.split(":")
            self.assertEqual(tables[kind][name], self.c[py], py)
        for kind, table in tables.items():  # and no Python name cake.h lacks
            names = {k for k in table if k is not None}
            self.assertEqual(names, {py.split(":")[1] for py in ENUMS if py.startswith(kind + ":")},
                             kind)

    def test_errors(self):
        self.assertEqual(sorted(caked._ERRORS), sorted(self.c[c] for c in ERRORS))


if __name__ == "__main__":
    unittest.main()
