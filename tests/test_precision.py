"""Training precision on a CPU: channels_last and bfloat16 autocast do what the config says (float16 is refused),
`--fast` asks for both, a float32 run on a CPU with native bfloat16 gets a one-line hint, and each (re)started
segment of a run records where it ran."""
import json

import pytest
import torch

import tiny
from crash_method import killed_at
from longtail import engine
from longtail.cli import FAST, main
from longtail.config import load_config
from longtail.engine import fit, precision_hint
from longtail.errors import ConfigError
from longtail.provenance import cpu_model, native_bf16
from longtail.training import fit as fit_module

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

TINY_CNN = [*tiny.TINY_MLP, "model.name=resnet32", "train.epochs=1"]
TINY_MLP = [*tiny.TINY_MLP, "train.epochs=2"]

AMX = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile\n"
AVX512_BF16 = "model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
PLAIN = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx2 fma\n"


def test_native_bfloat16_is_read_from_the_cpu_flags():
    assert native_bf16(AMX) == "AMX and AVX512-BF16"
    assert native_bf16(AVX512_BF16) == "AVX512-BF16"
    assert native_bf16(PLAIN) is None
    assert cpu_model(AVX512_BF16) == "AMD EPYC 9R14"


def test_a_float32_run_on_a_bf16_cpu_gets_a_hint_and_a_fast_one_does_not():
    cpu = torch.device("cpu")
    hint = precision_hint(load_config(None, TINY_MLP), cpu, AMX)
    assert hint.startswith("hint:") and "AMX" in hint and "--fast" in hint and "\n" not in hint
    assert precision_hint(load_config(None, TINY_MLP), cpu, PLAIN) is None
    assert precision_hint(load_config(None, [*TINY_MLP, *FAST]), cpu, AMX) is None
    assert precision_hint(load_config(None, TINY_MLP), torch.device("cuda"), AMX) is None


def test_more_in_autocast_gets_a_warning_and_more_in_float32_no_hint_to_leave_it():
    cpu, more = torch.device("cpu"), [*TINY_MLP, "more.enabled=true"]
    warning = precision_hint(load_config(None, [*more, *FAST]), cpu, AMX)
    assert warning.startswith("warning: more.enabled with train.amp: a bfloat16 forward pass") and "train.amp=false" in warning
    assert "a float16 forward" in precision_hint(load_config(None, [*more, "train.amp=true", "train.amp_dtype=float16"]),
                                                 torch.device("cuda"), PLAIN)
    assert precision_hint(load_config(None, more), cpu, AMX) is None


def test_the_hint_is_printed_once_at_the_start_of_a_float32_run(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setattr(fit_module, "native_bf16", lambda cpuinfo=None: "AMX")
    fit(load_config(None, [*TINY_MLP, "train.epochs=1"]), tmp_path / "run", data_root=data_root)
    assert capsys.readouterr().out.count("hint: this CPU has native bfloat16 (AMX)") == 1


def test_float16_autocast_on_a_cpu_is_refused_before_anything_is_written(tmp_path, data_root):
    cfg = load_config(None, [*TINY_MLP, "train.amp=true", "train.amp_dtype=float16"])
    with pytest.raises(ConfigError, match="amp_dtype=bfloat16"):
        fit(cfg, tmp_path / "run", data_root=data_root)
    assert not (tmp_path / "run").exists()


def test_channels_last_and_bfloat16_apply_on_a_cpu(tmp_path, data_root, monkeypatch):
    seen = []
    step = engine.Loop.__init__

    def spy(self, *args, **kwargs):  # the model as the loop trains it, and the input of its first forward
        step(self, *args, **kwargs)
        model = self.model

        def hook(module, inputs, output):
            seen.append((inputs[0].is_contiguous(memory_format=torch.channels_last), output.dtype,
                         model.conv1.weight.is_contiguous(memory_format=torch.channels_last)))

        model.conv1.register_forward_hook(hook)

    monkeypatch.setattr(engine.Loop, "__init__", spy)
    results = fit(load_config(None, [*TINY_CNN, *FAST]), tmp_path / "run", data_root=data_root)
    assert seen[0] == (True, torch.bfloat16, True)  # training: NHWC input and weights, bfloat16 convolutions
    assert seen[-1][1] == torch.float32  # evaluation runs in float32
    assert results["segments"][0]["precision"] == "bfloat16 autocast + channels_last"


def test_fast_sets_its_keys_and_an_explicit_override_wins(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("LONGTAIL_DATA", str(data_root))
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text("data:\n  name: fashion_mnist_lt\n")
    assert main(["train", str(config), *TINY_MLP, "train.epochs=1", "train.channels_last=false", "--fast",
                 "--out", str(out), "--quiet"]) == 0
    saved = (out / "config.yaml").read_text()
    assert "amp: true" in saved and "amp_dtype: bfloat16" in saved and "channels_last: false" in saved


def test_each_restarted_segment_of_a_run_records_where_it_ran(tmp_path, data_root):
    out = tmp_path / "run"
    cfg = load_config(None, [*TINY_MLP, "train.checkpoint_every=5"])
    killed_at(fit, cfg, out, data_root, 13 + 9)  # in epoch 2, after a mid-epoch checkpoint
    results = fit(cfg, out, resume=True, data_root=data_root)
    first, second = results["segments"]
    assert (first["epoch"], first["step"]) == (0, 0)
    assert second["epoch"] == 1 and second["step"] > 0  # mid-epoch: the batch it continued from
    for part in (first, second):
        assert part["torch"] == torch.__version__ and part["cpu"] == cpu_model() and part["precision"] == "float32"
        assert {"commit", "threads", "started", "device"} <= part.keys()
    assert json.loads((out / "results.json").read_text())["segments"] == results["segments"]
