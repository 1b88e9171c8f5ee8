"""``benches/before_after.py``: its alternation of the two checkouts, its table and the file it
appends to (the timing processes replaced by fixed answers), and one real child process."""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benches import before_after  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rounds_alternate_and_the_table_reports_medians_and_ratios(monkeypatch, tmp_path):
    calls = []
    times = {"before": iter([0.30, 0.20, 0.40]), "after": iter([0.10, 0.10, 0.40])}

    def fake_run(root, batch, names):
        which = "before" if root == "B" else "after"
        calls.append(which)
        assert names == ["m", "n@64"]
        return {"m train": next(times[which]), "op call: x": 2e-6}
    monkeypatch.setattr(before_after, "_run", fake_run)
    out = tmp_path / "ba.md"
    before_after.main(["--before", "B", "--after", "A", "--rounds", "3", "--out", str(out),
                       "--title", "a change", "--cases", "m,n@64"])
    assert calls == ["before", "after"] * 3
    text = out.read_text()
    assert "### " in text and "a change" in text
    # medians 300 ms before, 100 ms after; per-round ratios 3, 2, 1 -> median 2
    assert "| m train | 300.0 ms (200.0-400.0) | 100.0 ms (100.0-400.0) | 2.00x |" in text
    assert "| op call: x | 2.0 us (2.0-2.0) | 2.0 us (2.0-2.0) | 1.00x |" in text
    first_len = len(text)
    times.update(before=iter([0.2]), after=iter([0.2]))
    before_after.main(["--before", "B", "--after", "A", "--rounds", "1", "--out", str(out),
                       "--cases", "m,n@64"])
    again = out.read_text()
    assert again.startswith(text) and len(again) > first_len  # appended, not overwritten
    assert again.count("Speed before and after") == 1


def test_a_child_process_times_the_checkout_it_is_given():
    cases = before_after.CASES + ("msdnet-imagenet-step4@160",)  # a case at its own image side
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benches", "before_after.py"),
                           "--child", ROOT, "--batch", "2", "--cases", ",".join(cases)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    timings = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(timings) == {f"{c} {w}" for c in cases for w in ("train", "infer")} | {
        "op call: affine_relu_into_", "op call: conv 1x1", "op call: channel_stats"}
    assert all(t > 0 for t in timings.values())
