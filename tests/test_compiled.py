import copy

import pytest
import torch
import torch.nn as nn

from lightning_dance.compiled import CompileError, compile_for_inference
from lightning_dance.errors import DanceError
from lightning_dance.models import create_model


def _model(seed: int = 0, width: float = 0.25) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("r2plus1d_18", num_classes=5, width=width).eval()
    with torch.no_grad():  # BatchNorms with real statistics, so a wrong fold shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.normal_(std=0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
    return model


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_compiled_form_computes_the_model_and_leaves_it_alone(channels_last):
    from torch.profiler import profile

    model = _model()
    before = copy.deepcopy(model.state_dict())
    clip = torch.randn(1, 3, 4, 32, 32)
    run = compile_for_inference(model, clip, channels_last=channels_last)
    other = torch.randn(1, 3, 4, 32, 32)
    with profile() as prof:
        got = run(other)
    with torch.no_grad():
        want = model(other)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::native_batch_norm" not in ops  # folded by freezing
    # the user's model: same weights, same layout, still in eval mode, still eager
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous(), k
    assert not model.training
    # later changes to the model do not reach the compiled copy (documented)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    torch.testing.assert_close(run(other), want, atol=1e-4, rtol=1e-4)


def test_more_instances_than_the_recompile_limit_are_all_compiled():
    import torch._dynamo.config as dynamo_config

    # dynamo keys compiled code on the class's forward; past its limit a new instance would run
    # eager, which compile_for_inference must not allow (a timing would silently be eager)
    clip = torch.randn(1, 3, 4, 16, 16)
    with dynamo_config.patch(recompile_limit=1):
        for seed in range(3):
            torch.manual_seed(seed)
            model = create_model("tiny_c3d", num_classes=4).eval()
            run = compile_for_inference(model, clip)
            torch.testing.assert_close(run(clip), model(clip), atol=1e-5, rtol=1e-5)


class _Noisy(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x)


def test_bad_models_and_inputs_get_clear_errors(monkeypatch):
    model = create_model("tiny_c3d", num_classes=4)
    clip = torch.randn(1, 3, 4, 16, 16)
    with pytest.raises(ValueError, match="eval"):
        compile_for_inference(model.train(), clip)
    model.eval()
    with pytest.raises(ValueError, match="floating-point"):
        compile_for_inference(model, clip.to(torch.int64))
    with pytest.raises(CompileError, match="differs"):  # the output check can fail
        compile_for_inference(_Noisy().eval(), clip)
    with pytest.raises(CompileError, match="shape|failed"):  # a clip the model cannot take
        compile_for_inference(model, torch.randn(1, 5, 4, 16, 16))
    monkeypatch.setattr("lightning_dance.compiled.compiler_available", lambda: False)
    with pytest.raises(CompileError, match="C\\+\\+ compiler") as err:
        compile_for_inference(model, clip)
    assert isinstance(err.value, DanceError) and isinstance(err.value, RuntimeError)
