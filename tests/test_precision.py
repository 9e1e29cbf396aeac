"""Training precision on a CPU: channels_last and bfloat16 autocast do what the config says (float16 is refused),
`--fast` asks for both, a float32 run on a CPU with native bfloat16 gets a one-line hint, and each (re)started
segment of a run records where it ran."""
import json

import pytest
import torch

import tiny
from crash_method import killed_at
from longtail import engine, rundir
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
    scored = []  # the exported model's final scoring (results.json) is evaluated as the epochs were
    collect = rundir.collect_logits
    monkeypatch.setattr(rundir, "collect_logits", lambda *a, **k: scored.append(k.get("autocast")) or collect(*a, **k))
    results = fit(load_config(None, [*TINY_CNN, *FAST]), tmp_path / "run", data_root=data_root)
    assert seen[0] == (True, torch.bfloat16, True)  # training: NHWC input and weights, bfloat16 convolutions
    assert seen[-1] == (True, torch.bfloat16, True)  # --fast evaluates so too (eval.amp)
    assert scored == [torch.bfloat16]
    assert results["segments"][0]["precision"] == "bfloat16 autocast + channels_last, evaluated in bfloat16"
    seen.clear()
    results = fit(load_config(None, [*TINY_CNN, *FAST, "eval.amp=false"]), tmp_path / "run2", data_root=data_root)
    assert seen[0][1] == torch.bfloat16 and seen[-1][1] == torch.float32  # evaluation in float32
    assert scored[-1] is None
    assert results["segments"][0]["precision"] == "bfloat16 autocast + channels_last"


def test_eval_amp_computes_the_logits_in_bfloat16_close_to_float32(data_root):
    from longtail.inference import collect_logits, eval_precision
    from longtail.training.setup import setup

    run = setup(load_config(None, [*TINY_CNN, "train.channels_last=true", "train.amp_dtype=bfloat16"]), data_root)
    exact, targets = collect_logits(run.model, run.data.test, run.device, 64)
    assert eval_precision(run.cfg) == {}
    run.cfg.eval.amp = True
    assert eval_precision(run.cfg) == {"autocast": torch.bfloat16, "channels_last": True}
    rounded, same = collect_logits(run.model, run.data.test, run.device, 64, **eval_precision(run.cfg))
    assert torch.equal(targets, same) and rounded.dtype == torch.float32
    error = float((rounded - exact).abs().max() / exact.abs().max())
    assert 0 < error < 0.05  # rounded (bfloat16 keeps 8 bits of mantissa), not another model's logits


def test_eval_amp_in_float16_on_a_cpu_is_refused_before_anything_is_written(tmp_path, data_root):
    cfg = load_config(None, [*TINY_MLP, "eval.amp=true"])  # train.amp_dtype defaults to float16
    with pytest.raises(ConfigError, match="eval.amp evaluates in train.amp_dtype, float16"):
        fit(cfg, tmp_path / "run", data_root=data_root)
    assert not (tmp_path / "run").exists()


def test_fast_sets_its_keys_and_an_explicit_override_wins(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("LONGTAIL_DATA", str(data_root))
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text("data:\n  name: fashion_mnist_lt\n")
    assert main(["train", str(config), *TINY_MLP, "train.epochs=1", "train.channels_last=false", "--fast",
                 "--out", str(out), "--quiet"]) == 0
    saved = load_config(out / "config.yaml", [])
    assert saved.train.amp and saved.train.amp_dtype == "bfloat16" and saved.eval.amp
    assert not saved.train.channels_last


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


def test_eval_parity_scores_a_run_both_ways_and_its_float32_column_is_the_recorded_one(tmp_path, data_root, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("eval_parity", Path(__file__).parents[1] / "benchmarks" / "eval_parity.py")
    eval_parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_parity)
    results = fit(load_config(None, TINY_CNN), tmp_path / "run", data_root=data_root)
    [row] = eval_parity.main([str(tmp_path / "run"), "--data-root", str(data_root), "--json", str(tmp_path / "p.json")])
    assert row["float32"]["top1"] == results["top1"] and row["float32"]["ece"] == pytest.approx(results["ece"])
    assert abs(row["bfloat16"]["top1"] - results["top1"]) <= 100 * row["changed_predictions"] / row["test_images"]
    assert json.loads((tmp_path / "p.json").read_text()) == [row]
    assert "changed predictions |" in capsys.readouterr().out
