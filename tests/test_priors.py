"""The prior a model's logits are calibrated to (model.yaml's logit_prior) and the deployment-prior arithmetic."""
import math

import pytest
import torch

from longtail.config import load_config
from longtail.errors import ConfigError
from longtail.priors import logit_prior, logit_prior_vector, prior_shift, prior_vector, read_prior_file

ADDITIVE_1 = {"kind": "logit_adjustment", "form": "additive", "tau": 1.0}


@pytest.mark.parametrize("overrides,folds,expected", [
    ([], [], "train"),
    (["loss.name=focal"], [], "train"),
    (["loss.name=bce"], [], "train"),
    (["loss.name=ldam"], [{"kind": "logit_scale", "scale": 30.0}], "approx_uniform"),
    (["loss.name=ldam", "loss.drw_start=0.8", "model.head=cosine"], [], "approx_uniform"),
    (["loss.name=la"], [], "uniform"),
    (["loss.name=la", "loss.tau=0.5"], [], "approx_uniform"),
    (["loss.name=bs"], [{"kind": "temperature", "temperature": 1.7}], "uniform"),
    (["loss.name=cb"], [], "approx_uniform"),
    (["loss.drw_start=0.8"], [], "approx_uniform"),
    (["data.sampler=class_balanced", "method.name=crt"], [], "approx_uniform"),
    (["data.sampler=sqrt"], [], "approx_uniform"),
    (["method.name=crt"], [], "train"),  # re-trained on the instance sampler with CE: the training prior again
    (["method.name=lws", "data.sampler=class_balanced"], [{"kind": "lws_scales"}], "approx_uniform"),
    (["method.name=wb_stage2"], [], "approx_uniform"),
    (["method.name=tau_norm"], [{"kind": "tau_norm", "tau": 1.0}], "approx_uniform"),
    ([], [{"kind": "more_merge"}, ADDITIVE_1, {"kind": "temperature", "temperature": 0.8}], "uniform"),
    ([], [{**ADDITIVE_1, "tau": 0.5}], "approx_uniform"),
    ([], [{**ADDITIVE_1, "tau": 0.0}], "train"),
    ([], [{"kind": "logit_adjustment", "form": "multiplicative", "tau": 1.6}], "approx_uniform"),
    (["method.name=ewb", "model.head=etf"], [{"kind": "logit_adjustment", "form": "multiplicative", "tau": 1.6}],
     "approx_uniform"),
    (["loss.name=la"], [{**ADDITIVE_1, "tau": 0.3}], "approx_uniform"),  # adjusted twice: pi^-0.3
])
def test_logit_prior_table(overrides, folds, expected):
    prior, note = logit_prior(load_config(None, overrides), folds)
    assert prior == expected, note
    assert note


def test_the_note_names_the_exponent_of_an_exact_shift_that_is_not_uniform():
    assert "pi^0.5" in logit_prior(load_config(None, ["loss.name=la", "loss.tau=0.5"]), [])[1]
    assert "pi^-0.3" in logit_prior(load_config(None, ["loss.name=la"]), [{**ADDITIVE_1, "tau": 0.3}])[1]
    prior, note = logit_prior(load_config(None, ["loss.name=ldam", "loss.drw_start=0.8"]), [])
    assert "margins" in note and "DRW" in note and "no exact amount" in note


def test_prior_vectors_and_the_shift():
    counts = [30, 10]
    assert prior_vector("train", counts).tolist() == [0.75, 0.25]
    assert prior_vector("uniform", counts).tolist() == [0.5, 0.5]
    assert torch.equal(logit_prior_vector("approx_uniform", counts), prior_vector("uniform", counts))
    shift = prior_shift(prior_vector("uniform", counts), prior_vector("train", counts))
    z = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    # Logits with the training prior moved to uniform: the rare class gains log(0.75 / 0.25).
    assert (z + shift).softmax(1)[0].tolist() == pytest.approx([0.25, 0.75])
    with pytest.raises(ConfigError, match="logit_prior 'balanced'"):
        logit_prior_vector("balanced", counts)


def test_prior_file_is_normalised_and_checked(tmp_path):
    path = tmp_path / "prior.txt"
    path.write_text("3\n\n1\n0\n")  # counts, a blank line, a class ruled out
    prior = read_prior_file(path, 3)
    assert prior.tolist() == [0.75, 0.25, 0.0]
    assert prior_shift(prior, prior_vector("uniform", [1, 1, 1]))[2] == -math.inf
    for text, message in [("1\n2\n", "2 numbers, but the model has 3"), ("1\n-1\n2\n", ">= 0"),
                          ("0\n0\n0\n", "not all 0"), ("1\nx\n2\n", "one number"), ("1\nnan\n1\n", "finite")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_prior_file(path, 3)
    with pytest.raises(ConfigError, match="not uniform, train, or an existing file"):
        prior_vector(str(tmp_path / "missing.txt"), [1, 1, 1])
