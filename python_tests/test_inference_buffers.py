"""MSDNet's CPU inference keeps its scale buffers from one run to the next
(``models/buffer_pool.py``): a reused buffer must never change a result, never be shared by
two live runs, and never travel with a copied model."""
import copy
import pickle
import threading

import pytest
import torch

import msdnet_ops
from conftest import MSDNET_CONFIGS as CONFIGS, MSDNET_SMALL as SMALL, msdnet_pair
from msdnet_ops.models.buffer_pool import BufferPool

F64 = torch.float64


def _eval_pair(cfg=SMALL):
    ref, ours = msdnet_pair(cfg)
    ref.eval()
    ours.eval()
    return ref, ours


def _assert_logits(got, want, what):
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{what}: exit {k}")


def _kept(model):
    return list(model._buffer_pool._free.values())


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_second_forward_reuses_the_buffers_and_reads_nothing_stale(use_backend, config):
    """The kept buffers are handed to the next run of the same shape; filled with NaN in
    between, they change no logit (every value a run reads, it wrote first)."""
    use_backend("cpu")
    cfg, size = CONFIGS[config]
    ref, ours = _eval_pair(cfg)
    x = torch.randn(3, 3, size, size, dtype=F64)
    with torch.no_grad():
        want = ref(x)
        _assert_logits(ours(x), want, "first forward")
        kept = _kept(ours)
        assert kept, "a finished forward kept no buffer"
        for t in kept:
            t.fill_(float("nan"))
        taken = []
        take = ours._buffer_pool.take

        def spy(*args, **kwargs):
            taken.append(take(*args, **kwargs))
            return taken[-1]
        ours._buffer_pool.take = spy
        _assert_logits(ours(x), want, "forward on reused buffers")
    assert {t.data_ptr() for t in kept} <= {t.data_ptr() for t in taken}


def test_interleaved_and_abandoned_anytime_runs_stay_apart(use_backend):
    """Two anytime generators advanced in turn (each holds its own buffers), one closed after
    its first exit (its buffers go back), then a full forward: every logit as in plain."""
    use_backend("cpu")
    ref, ours = _eval_pair()
    xa, xb = (torch.randn(2, 3, 32, 32, dtype=F64) for _ in range(2))
    with torch.no_grad():
        want_a, want_b = ref(xa), ref(xb)
        gen_a, gen_b = ours.anytime(xa), ours.anytime(xb)
        got_a, got_b = [], []
        for _ in range(ours.num_exits):
            got_a.append(next(gen_a))
            got_b.append(next(gen_b))
        _assert_logits(got_a, want_a, "generator a")
        _assert_logits(got_b, want_b, "generator b")
        early = ours.anytime(xb)
        torch.testing.assert_close(next(early), want_b[0], rtol=1e-10, atol=1e-10)
        early.close()
        assert _kept(ours)
        _assert_logits(ours(xa), want_a, "forward after a closed generator")


def test_a_released_run_refuses_to_go_on(use_backend):
    use_backend("cpu")
    _, ours = _eval_pair()
    with torch.no_grad():
        run = ours.start(torch.randn(2, 3, 32, 32, dtype=F64))
        run.exit_logits(0)
        run.release()
        for k in (0, 1):  # an exit already computed, one still to compute
            with pytest.raises(RuntimeError, match="released"):
                run.exit_logits(k)


def test_concurrent_runs_on_one_model_never_share_a_buffer(use_backend):
    use_backend("cpu")
    ref, ours = _eval_pair()
    inputs = [torch.randn(2, 3, 32, 32, dtype=F64) for _ in range(4)]
    with torch.no_grad():
        wants = [ref(x) for x in inputs]
    errors = []

    def worker(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    _assert_logits(ours(inputs[i]), wants[i], f"thread {i}")
        except Exception as e:  # reported by the main thread
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_budgeted_classification_gives_its_buffers_back(use_backend):
    """After a budgeted classification with compaction the pool holds the full-batch buffers
    again (only the pool's own tensors are kept, not the gathered ones), and a second call
    on reused buffers gives the same answer."""
    use_backend("cpu")
    _, ours = _eval_pair()
    x = torch.randn(8, 3, 32, 32, dtype=F64)
    with torch.no_grad():
        conf = torch.softmax(ours(x)[0], 1).max(1).values
    clf = msdnet_ops.BudgetedClassifier(ours, [conf.median().item(), 0.0, 0.0])
    first = clf.predict(x)
    assert 0 < (first.exits == 0).sum() < 8
    assert {t.shape[0] for t in _kept(ours)} == {8}
    second = clf.predict(x)
    assert torch.equal(first.predictions, second.predictions)
    assert torch.equal(first.exits, second.exits)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_budgeted_classification_after_compaction_equals_plain(use_backend, config):
    """Samples compacted away at exit 1 leave the rest to cells deferred past it (with
    ``base=1`` the finest scale's first layer, which reads the stem's channels): every sample's
    class is the plain model's at the exit it left from, and the samples that went on are not
    given the full batch's stem output."""
    use_backend("cpu")
    cfg, size = CONFIGS[config]
    ref, ours = _eval_pair(cfg)
    x = torch.randn(7, 3, size, size, dtype=F64)
    with torch.no_grad():
        want = ref(x)
        conf = torch.softmax(want[0], 1).max(1).values
    thresholds = [conf.median().item()] + [0.0] * (len(want) - 1)
    got = msdnet_ops.BudgetedClassifier(ours, thresholds).predict(x)
    assert 0 < (got.exits == 0).sum() < 7 and (got.exits <= 1).all()
    for i, k in enumerate(got.exits.tolist()):
        assert got.predictions[i] == want[k][i].argmax(), f"sample {i} at exit {k}"


def test_copies_start_empty_and_release_frees(use_backend):
    """Copies and pickles of a model that ran inference carry neither its kept buffers nor its
    folded weights (a pickle is no larger than the fresh model's), and infer as it does."""
    use_backend("cpu")
    _, ours = _eval_pair()
    fresh_size = len(pickle.dumps(ours))
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    with torch.no_grad():
        want = ours(x)
    assert ours._buffer_pool.nbytes() > 0
    assert copy.deepcopy(ours)._buffer_pool.nbytes() == 0
    assert pickle.loads(pickle.dumps(ours))._buffer_pool.nbytes() == 0
    assert len(pickle.dumps(ours)) <= fresh_size
    for twin in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        with torch.no_grad():
            for a, b in zip(twin(x), want):
                assert torch.equal(a, b)
    ours.release_inference_buffers()
    assert ours._buffer_pool.nbytes() == 0


def test_release_refolds_weights_written_through_data(use_backend):
    """A write through ``.data`` bumps no version counter, so the folded convolutions kept
    between passes cannot see it; after ``release_inference_buffers()`` the next pass folds
    the weights as they are: the plain model's logits with the same write."""
    use_backend("cpu")
    ref, ours = _eval_pair()
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    with torch.no_grad():
        ours(x)  # folds and keeps every unit
    for model in (ref, ours):
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.data.mul_(1.5)
    ours.release_inference_buffers()
    with torch.no_grad():
        for k, (a, b) in enumerate(zip(ours(x), ref(x))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"logits of exit {k}")


def _assert_equals_plain(ours, ref, x, what):
    with torch.no_grad():
        _assert_logits(ours(x), ref(x), what)


def test_prepared_calls_follow_the_convolution_setting(use_backend, monkeypatch):
    """Each unit's call is prepared once per geometry and setting: after
    ``MSDNET_OPS_CPU_CONV`` changes between passes the next pass runs the newly chosen kernels
    (the fused bottleneck where it was oneDNN's two convolutions, and back), every pass equal
    to the plain model."""
    from msdnet_ops.kernels import cpu as cpu_kernels
    use_backend("cpu")
    ref, ours = _eval_pair()
    fused_runs = []
    prepare = cpu_kernels.prepared_bottleneck_direct_conv

    def spied(*args):
        run = prepare(*args)
        return lambda x, out: fused_runs.append(1) or run(x, out)
    monkeypatch.setattr(cpu_kernels, "prepared_bottleneck_direct_conv", spied)
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    for choice, fused in (("onednn", False), ("direct", True), ("onednn", False)):
        monkeypatch.setenv("MSDNET_OPS_CPU_CONV", choice)
        fused_runs.clear()
        _assert_equals_plain(ours, ref, x, choice)
        assert bool(fused_runs) == fused, choice


def test_prepared_calls_per_unit_are_bounded(use_backend, monkeypatch):
    """Passes over many batch sizes (a budgeted run's samples left after an early exit) keep
    at most ``FoldedUnit.MAX_PREPARED`` prepared calls per unit, and stay equal to the plain
    model."""
    from msdnet_ops.models.msdnet_inference import FoldedUnit
    use_backend("cpu")
    monkeypatch.setattr(FoldedUnit, "MAX_PREPARED", 3)
    ref, ours = _eval_pair()
    for batch in (1, 2, 3, 4, 5, 2):
        _assert_equals_plain(ours, ref, torch.randn(batch, 3, 32, 32, dtype=F64),
                             f"batch {batch}")
    units = [u for kept in ours._folded._units.values()
             for u in (kept if isinstance(kept, tuple) and not isinstance(kept, FoldedUnit)
                       else (kept,)) if u is not None]
    sizes = [len(u.prepared) for u in units]  # (a path's 3x3 unit: its bottleneck's keeps it)
    assert units and 0 < max(sizes) <= 3


def test_the_pool_keeps_cpu_tensors_of_its_most_recent_shapes():
    pool = BufferPool(max_shapes=2)
    tensors = [pool.take((n, 4, 3, 3), dtype=torch.float32, device="cpu") for n in (1, 2, 3)]
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors)
    for t in tensors:
        pool.give_back(t)
    assert sorted(t.shape[0] for t in pool._free.values()) == [2, 3]
    again = pool.take((3, 4, 3, 3), dtype=torch.float32, device="cpu")
    assert again.data_ptr() == tensors[2].data_ptr()
    other = pool.take((3, 4, 3, 3), dtype=torch.float64, device="cpu")
    assert other.data_ptr() != tensors[2].data_ptr()
    pool.give_back(torch.empty(8, 4, 3, 3, device="meta"))  # not a CPU tensor: not kept
    assert all(t.device.type == "cpu" for t in pool._free.values())
