"""gla.testing: assert_rewrites, check_equivalence and the gla_isolation fixture catch what they must."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gla
from gla.rewrite import leaf
from gla.testing import assert_rewrites, check_equivalence, default_tolerance, gla_isolation, isolated  # noqa: F401

FAST = {"inner": "aot_eager"}


class SwiGLU(torch.nn.Module):
    def __init__(self, d=16, f=24):
        super().__init__()
        self.gate, self.up, self.down = torch.nn.Linear(d, f), torch.nn.Linear(d, f), torch.nn.Linear(f, d)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class WrongBackward(torch.autograd.Function):
    """sigmoid(x) * y forward, a gradient for x that is off by a factor 2."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return torch.sigmoid(x) * y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        s = torch.sigmoid(x)
        return 2 * g * y * s * (1 - s), g * s


def test_assert_rewrites_passes_and_returns_the_report():
    torch.manual_seed(0)
    report = assert_rewrites(SwiGLU(), torch.randn(3, 16), expect={"glu": 1, "attention": 0})
    assert report.counts["glu"] == 1
    assert report.rewrites[0].verification["rel_rms"] < 1e-5


def test_assert_rewrites_compares_gradients_of_inputs_and_parameters():
    torch.manual_seed(0)
    report = assert_rewrites(SwiGLU(), torch.randn(3, 16), expect={"glu": 1}, grad=True)
    assert "grad_rel_rms" in report.rewrites[0].verification


def test_assert_rewrites_fails_on_a_wrong_count_with_a_readable_diff():
    torch.manual_seed(0)
    with pytest.raises(AssertionError) as info:
        assert_rewrites(SwiGLU(), torch.randn(3, 16), expect={"glu": 2, "gate": 0})
    msg = str(info.value)
    assert "glu: 2 → 1" in msg                      # expected vs got
    assert "gate" not in msg.split("\n")[1]          # only the kinds that differ are listed as differing
    assert "glu_silu" in msg and "verified" in msg   # the report table
    assert "output 0" in msg and "ok" in msg         # per-tensor figures


def test_assert_rewrites_catches_a_wrong_replacement_forced_through_with_verify_off():
    gla.register_pattern("lies", search=lambda x, y: torch.sigmoid(x) * y,
                         replacement=lambda x, y: torch.tanh(x) * y)
    f = lambda a, b: torch.sigmoid(a) * b
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    options = {"patterns": ["custom"], "verify": "off"}
    with pytest.raises(AssertionError) as info:
        assert_rewrites(f, a, b, expect={"custom": 1}, options=options)
    msg = str(info.value)
    assert "FAIL output 0" in msg and "not verified" in msg, msg
    assert "rewrite counts differ" not in msg  # the count was right; the numbers were not


@leaf  # one opaque graph node: AOT autograd keeps the Function's own backward
def wrong_backward(x, y):
    return WrongBackward.apply(x, y)


def test_assert_rewrites_catches_a_wrong_gradient():
    gla.register_pattern("bad_grad", search=lambda x, y: torch.sigmoid(x) * y, replacement=wrong_backward)
    f = lambda a, b: torch.sigmoid(a) * b
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    options = {"patterns": ["custom"], "verify": "off"}
    assert_rewrites(f, a, b, expect={"custom": 1}, options=options)  # forward is right
    with pytest.raises(AssertionError, match=r"FAIL grad of input 0"):
        assert_rewrites(f, a, b, expect={"custom": 1}, options=options, grad=True)


def test_assert_rewrites_judges_a_miss_against_float64():
    """Eager rounds too. Under a tolerance tighter than eager's own rounding, a replacement more
    accurate than eager passes (a float64 run arbitrates), and one a little wrong still fails."""
    f = lambda a, b: torch.sigmoid(a) * b  # noqa: E731
    torch.manual_seed(0)
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    opts = {"patterns": ["custom"]}
    with gla.pattern_scope():
        gla.register_pattern("exact", search=f,
                             replacement=lambda a, b: (torch.sigmoid(a.double()) * b.double()).float())
        report = assert_rewrites(f, a, b, expect={"custom": 1}, options=opts, rtol=1e-8)
        assert report.counts["custom"] == 1
    torch._dynamo.reset()
    with gla.pattern_scope():
        gla.register_pattern("off", search=f, replacement=lambda a, b: torch.sigmoid(a) * b * (1 + 1e-6))
        with pytest.raises(AssertionError, match=r"FAIL output 0 .*vs float64"):
            assert_rewrites(f, a, b, expect={"custom": 1}, options=opts, rtol=1e-8)


class OffGradient(torch.autograd.Function):
    """x * y forward; y's gradient off by the relative amount ``EPS``."""
    EPS = 0.0

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return x * y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return g * y, g * x * (1 + OffGradient.EPS)


@leaf
def off_gradient(x, y):
    return OffGradient.apply(x, y)


def _judge_second_gradient(f, replacement, function_cls, eps, passes, *inputs):
    """Rewrite ``f`` into ``replacement`` (whose autograd Function puts a relative error ``eps``
    in the second input's gradient); assert_rewrites must pass, or fail on that gradient."""
    opts = {"patterns": ["custom"], "verify": "off"}
    function_cls.EPS = eps
    try:
        with gla.pattern_scope():
            gla.register_pattern(replacement.__name__, search=f, replacement=replacement)
            if passes:
                assert_rewrites(f, *inputs, expect={"custom": 1}, options=opts, grad=True)
            else:
                with pytest.raises(AssertionError, match=r"FAIL grad of input 1 .*vs float64"):
                    assert_rewrites(f, *inputs, expect={"custom": 1}, options=opts, grad=True)
    finally:
        function_cls.EPS = 0.0


class ScaledSum(torch.autograd.Function):
    """(x * w).sum(-1) forward; w's gradient ``EPS`` relatively off."""
    EPS = 0.0

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return (x * w).sum(-1)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g[..., None] * w, (g[..., None] * x).sum(0) * (1 + ScaledSum.EPS)


@leaf
def scaled_sum(x, w):
    return ScaledSum.apply(x, w)


@pytest.mark.parametrize("eps, passes", [(3e-5, True), (3e-3, False)])
def test_assert_rewrites_allows_eagers_band_where_eager_itself_is_near_the_tolerance(eps, passes):
    """A result whose eager value is itself off float64 by more than a tenth of the tolerance is
    ill-conditioned in that dtype (here eager's gradient of w is the difference of two sums 50x
    its size): a replacement within 10x the tolerance passes, one beyond that band still fails."""
    f = lambda x, w: (x * w).sum(-1) * 50.0 - (x * w).sum(-1) * 49.0  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4096, 3, generator=gen), torch.randn(3, generator=gen)
    _judge_second_gradient(f, scaled_sum, ScaledSum, eps, passes, x, w)


@pytest.mark.parametrize("x_scale, eps, passes", [
    (1e-3, 5e-5, True),   # a small gradient, 5x the tolerance off: within what fp32 resolves overall
    (1e-3, 0.5, False),   # a small gradient that is wrong
    (1.0, 5e-5, False),   # the same relative error in a gradient as large as the others
])
def test_assert_rewrites_judges_a_small_gradient_against_the_largest(x_scale, eps, passes):
    """A gradient much smaller than the others (cancelling terms: dq beside dv in attention over
    few keys) is rounded relative to the whole gradient; it passes when its error is within the
    tolerance of the largest gradient's norm and 10x the tolerance relatively, and fails otherwise."""
    f = lambda x, y: x * y  # noqa: E731
    torch.manual_seed(0)
    x, y = torch.randn(64, 64) * x_scale, torch.randn(64, 64)
    _judge_second_gradient(f, off_gradient, OffGradient, eps, passes, x, y)


def test_assert_rewrites_tolerates_nan_where_eager_has_nan():
    lin1, lin3 = torch.nn.Linear(8, 12), torch.nn.Linear(8, 12)
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    assert_rewrites(lambda x: F.silu(lin1(x)) * lin3(x), x, expect={"glu": 1})


def test_default_tolerance_follows_the_dtype():
    assert default_tolerance(torch.float32) == 1e-5
    assert default_tolerance(torch.float32, torch.bfloat16) == 1e-2
    assert default_tolerance(torch.int64) == 1e-5


def test_check_equivalence_returns_figures():
    fig = check_equivalence(lambda x, y: torch.sigmoid(x) * y, lambda x, y: y / (1 + torch.exp(-x)),
                            torch.randn(5, 7), torch.randn(5, 7))
    assert fig["rel_rms"] < 1e-6 and fig["grad_rel_rms"] < 1e-6 and fig["threshold"] == 1e-5
    assert len(fig["trials"]) == 3  # the example inputs and two fresh random sets


def test_check_equivalence_half_precision_and_bool_masks():
    def search(s, keep):
        return torch.softmax(s.masked_fill(~keep, float("-inf")), -1)

    def fused(s, keep):  # computes in fp32: allowed (it is closer to the float64 reference)
        return torch.softmax(torch.where(keep, s.float(), float("-inf")), -1).to(s.dtype)

    keep = torch.ones(4, 9, dtype=torch.bool)
    fig = check_equivalence(search, fused, torch.randn(4, 9, dtype=torch.bfloat16), keep)
    assert fig["threshold"] == 1e-2


def test_check_equivalence_catches_wrong_values_shapes_and_gradients():
    x, y = torch.randn(5, 7), torch.randn(5, 7)
    search = lambda x, y: torch.sigmoid(x) * y
    with pytest.raises(AssertionError, match=r"output 0 rel RMS .* > 1e-05"):
        check_equivalence(search, lambda x, y: torch.tanh(x) * y, x, y)
    with pytest.raises(AssertionError, match=r"is \(5,\)"):
        check_equivalence(search, lambda x, y: (torch.sigmoid(x) * y).sum(-1), x, y)
    with pytest.raises(AssertionError, match=r"gradient of argument 0"):
        check_equivalence(search, WrongBackward.apply, x, y)
    check_equivalence(search, WrongBackward.apply, x, y, grad=False)  # forward alone is right


def test_check_equivalence_catches_an_error_only_random_inputs_show():
    # right on the example (all positive), wrong for negative inputs
    x = torch.rand(6, 6) + 0.1
    with pytest.raises(AssertionError, match="random inputs"):
        check_equivalence(torch.relu, lambda t: t.abs(), x, grad=False)


def test_isolation_resets_counters_cache_and_patterns():
    from torch._dynamo.utils import counters

    counters["gla"]["glu"] += 3
    with isolated():
        assert counters["gla"]["glu"] == 0
        gla.register_pattern("scoped", search=lambda x: torch.sigmoid(x) * x, replacement=lambda x: F.silu(x))
    assert "scoped" not in [p.name for p in gla.registered_patterns()]


def test_gla_isolation_fixture(gla_isolation):
    from torch._dynamo.utils import counters

    assert not counters["gla"]
    gla.register_pattern("fixture_scoped", search=lambda x: torch.sigmoid(x) * x, replacement=lambda x: F.silu(x))


def test_gla_isolation_fixture_left_nothing_behind(gla_isolation):
    assert "fixture_scoped" not in [p.name for p in gla.registered_patterns()]


def test_importing_gla_testing_does_not_import_pytest():
    code = "import sys, gla.testing; assert 'pytest' not in sys.modules, 'pytest imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
