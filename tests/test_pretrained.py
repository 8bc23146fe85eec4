"""timm checkpoints load into our model and compute the same logits; our weight files round-trip.

conftest.py imports torch and timm before anything can import TensorFlow (the
tensorflow-then-triton segfault); torch/timm are only a guard here, not a skip.
"""

import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from effnet_jax import build_architecture, create_model, eval_view, from_constants  # noqa: E402
from effnet_jax.errors import UserError  # noqa: E402
from effnet_jax.pretrained import (  # noqa: E402
    load_timm,
    load_weights,
    load_weights_into,
    read_metadata,
    save_weights,
    to_timm_state_dict,
)

TOL = 1e-4  # float32 logits


@nnx.jit
def run(model, x):
    return model(x)


def randomized(name, seed=0, **kw):
    """A timm model in eval mode with non-trivial BN statistics, affine params and biases."""
    torch.manual_seed(seed)  # timm's own initialisation draws from the global generator
    model = timm.create_model(name, pretrained=False, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def flat(model):
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))}


def assert_same_weights(a, b, skip=()):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if not k.startswith(skip):
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def compare_logits(timm_model, ours, res, batch=2):
    x = np.random.default_rng(res).standard_normal((batch, res, res, 3)).astype(np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine, torch's spinning threads are ~10x slower
    try:
        with torch.no_grad():
            ref = timm_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    finally:
        torch.set_num_threads(threads)
    out = np.asarray(run(eval_view(ours), jnp.asarray(x)))
    assert out.shape == ref.shape
    diff = float(np.abs(out - ref).max())
    print(f"max |diff| {diff:.3g} (logits std {ref.std():.3g}, max |logit| {np.abs(ref).max():.3g})")
    assert diff <= TOL
    return diff


@pytest.fixture(scope="module")
def b0():
    """(timm model, its numpy state dict, our converted model)."""
    tm = randomized("tf_efficientnet_b0", seed=0)
    sd = numpy_state(tm)
    return tm, sd, load_timm(tm.state_dict())


def one_line_error(fn, *needles):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


# -- numerical equivalence --------------------------------------------------------------


def test_b0_logits_match_timm(b0):
    tm, _, ours = b0
    assert ours.classifier.out_features == 1000
    compare_logits(tm, ours, 224)


def test_reference_kernels_load_the_same_weights_and_match_timm(b0):
    # One parameter layout: flax's own layers (model.kernels="reference") take timm's weights unconverted.
    tm, sd, ours = b0
    ref = load_timm(sd, kernels="reference")
    assert ref.kernels == "reference" and ours.kernels == "fast"
    assert_same_weights(ours, ref)
    compare_logits(tm, ref, 64)


def test_scanned_model_loads_timm_weights_and_matches_timm(b0, tmp_path):
    # model.scan_blocks stacks each stage's repeated blocks inside the forward only: timm's weights load
    # unconverted, the logits match timm, and weight files and timm's state dict come out the same.
    tm, sd, ours = b0
    scanned = load_timm(sd, scan_blocks=True)
    assert scanned.scan_blocks and not ours.scan_blocks
    assert_same_weights(ours, scanned)
    compare_logits(tm, scanned, 64)
    back = to_timm_state_dict(scanned)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    save_weights(scanned, tmp_path / "w.safetensors", "b0")
    again = load_weights(tmp_path / "w.safetensors", scan_blocks=True)
    assert again.scan_blocks
    assert_same_weights(again, ours)


def test_b2_ten_classes_from_safetensors_at_odd_resolution(tmp_path):
    from safetensors.numpy import save_file

    tm = randomized("tf_efficientnet_b2", seed=1, num_classes=10)
    sd = numpy_state(tm)
    path = tmp_path / "b2.safetensors"
    save_file({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, str(path))
    ours = load_timm(path, depthwise_impl="xla")  # the other depthwise implementation than b0's on CPU
    assert ours.classifier.out_features == 10 and len(ours.arch.blocks) == 23
    assert ours.arch.stem_channels == 32 and ours.arch.head_channels == 1408
    compare_logits(tm, ours, 199, batch=1)


# -- file formats -------------------------------------------------------------------------


def test_safetensors_and_wrapped_pth_load_the_same_weights(b0, tmp_path):
    from safetensors.numpy import save_file

    tm, sd, ours = b0
    st = tmp_path / "b0.safetensors"
    save_file(sd, str(st))
    assert_same_weights(load_timm(st), ours)
    # A timm training checkpoint: wrapped, DataParallel prefix, non-tensor extras.
    pth = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tm.state_dict().items()}, "epoch": 3}, pth)
    assert_same_weights(load_timm(str(pth), arch="tf_efficientnet_b0"), ours)


CALLED = []


def _mark_called():
    CALLED.append(True)
    return {}


class _Sneaky:
    def __reduce__(self):
        return (_mark_called, ())


def test_pth_never_unpickles_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": _Sneaky()}, path)
    one_line_error(lambda: load_timm(path), "weights_only", str(path))
    assert not CALLED


def test_pth_without_torch_is_a_user_error(tmp_path, monkeypatch):
    path = tmp_path / "x.pth"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)
    one_line_error(lambda: load_timm(path), "needs PyTorch")


# -- refusing checkpoints that do not fit -----------------------------------------------


def test_wrong_shape_names_the_key(b0):
    sd = dict(b0[1])
    sd["blocks.3.1.conv_dw.weight"] = np.zeros((480, 1, 5, 5), np.float32)
    one_line_error(lambda: load_timm(sd), "blocks.3.1.conv_dw.weight", "(480, 1, 5, 5)", "(480, 1, 3, 3)")


def test_missing_and_unexpected_keys_are_named(b0):
    sd = dict(b0[1])
    del sd["blocks.5.2.bn2.running_var"]
    one_line_error(lambda: load_timm(sd), "missing key blocks.5.2.bn2.running_var")
    sd = dict(b0[1], **{"blocks.2.0.extra.weight": np.zeros(3, np.float32)})
    one_line_error(lambda: load_timm(sd), "unexpected key blocks.2.0.extra.weight")


def test_explicit_arch_and_classes_must_fit(b0):
    sd = b0[1]
    one_line_error(lambda: load_timm(sd, arch="b1"), "b1", "missing key blocks.0.1.")
    one_line_error(lambda: load_timm(sd, num_classes=10), "classifier.weight", "num_classes=10")
    bad_stem = dict(sd, **{"conv_stem.weight": np.zeros((36, 3, 3, 3), np.float32)})
    one_line_error(lambda: load_timm(bad_stem), "conv_stem.weight", "36 channels")
    one_line_error(lambda: load_timm({"fc.weight": np.zeros((2, 2))}), "missing key")


def test_headless_checkpoint_takes_a_fresh_classifier(b0):
    _, sd, ours = b0
    headless = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    one_line_error(lambda: load_timm(headless), "num_classes")
    model = load_timm(headless, num_classes=7)
    assert model.classifier.kernel.shape == (1280, 7)
    assert_same_weights(model, ours, skip=("classifier.",))


def test_infers_a_formula_scaled_timm_model():
    from timm.models.efficientnet import _gen_efficientnet

    spec = from_constants(1.2, 1.1, 1.15, phi=2)  # width 1.21, depth 1.44: no official model
    tm = _gen_efficientnet("tf_efficientnet_b0", channel_multiplier=spec.width, depth_multiplier=spec.depth,
                           bn_eps=1e-3, pad_type="same", num_classes=3)
    ours = load_timm(tm.state_dict())
    expected = build_architecture(spec)
    assert ours.arch.blocks == expected.blocks and ours.arch.head_channels == expected.head_channels
    back = to_timm_state_dict(ours)
    for k, v in tm.state_dict().items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


# -- reverse direction and our own format ----------------------------------------------


def test_to_timm_state_dict_round_trip(b0):
    _, sd, ours = b0
    back = to_timm_state_dict(ours)
    assert list(back) == list(sd)  # same keys, same order
    fresh = timm.create_model("tf_efficientnet_b0", pretrained=False)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)


def test_save_and_load_weights_round_trip(b0, tmp_path):
    ours = b0[2]
    path = tmp_path / "sub" / "b0.safetensors"
    save_weights(ours, path)
    meta = read_metadata(path)
    assert meta["official"] == "b0" and meta["spec"]["resolution"] == 224 and meta["num_classes"] == 1000
    assert meta["effnet_jax_version"]
    loaded = load_weights(path)
    assert loaded.arch == ours.arch
    assert_same_weights(loaded, ours)
    # Training-time overrides leave the weights alone.
    respread = load_weights(path, drop_path_rate=0.4, dropout=0.1)
    assert respread.arch.blocks[-1].drop_path == pytest.approx(0.4 * 15 / 16)
    assert_same_weights(respread, ours)


def test_load_weights_with_another_class_count(b0, tmp_path):
    ours = b0[2]
    path = tmp_path / "b0.safetensors"
    save_weights(ours, path)
    one_line_error(lambda: load_weights(path, num_classes=5), "1000-class", "reset_classifier=True")
    tuned = load_weights(path, num_classes=5, reset_classifier=True, seed=3)
    assert tuned.classifier.kernel.shape == (1280, 5)
    assert_same_weights(tuned, ours, skip=("classifier.",))
    # The trainer's init_from path: an existing model, classifier kept when classes differ.
    target = create_model("b0", num_classes=10, seed=1)
    skipped = load_weights_into(target, path)
    assert sorted(skipped) == ["classifier.bias", "classifier.kernel"]
    assert target.classifier.kernel.shape == (1280, 10)
    np.testing.assert_array_equal(np.asarray(target.head_bn.var.get_value()), flat(ours)["head_bn.var"])
    one_line_error(lambda: load_weights_into(create_model("b1"), path), "does not fit", "blocks")
    one_line_error(lambda: load_weights(b0_timm_file(tmp_path, b0[1])), "timm checkpoint", "load_timm")


def b0_timm_file(tmp_path, sd):
    from safetensors.numpy import save_file

    path = tmp_path / "timm_b0.safetensors"
    save_file(sd, str(path))
    return path


# -- the CLI -------------------------------------------------------------------------------


def _convert_main():
    from suite_paths import load_script

    return load_script("convert_timm").main


@pytest.mark.slow
def test_convert_cli(b0, tmp_path, capsys):
    main = _convert_main()
    src, out = b0_timm_file(tmp_path, b0[1]), tmp_path / "ours.safetensors"
    main([str(src), str(out)])
    printed = capsys.readouterr().out
    assert "inferred: b0" in printed and "5,288,548 parameters" in printed and "1000 classes" in printed
    assert_same_weights(load_weights(out), b0[2])
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing.pth"), str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint not found") and err.count("\n") == 1
