"""BatchTopK SAE training (caft_jax.discovery.sae_train): the step against a PyTorch version of dictionary_learning's
loss, recovery of a planted dictionary, the saved files against torch.load and the BatchTopKSAE layout, and the
`discover train-sae` command on a tiny model."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import save_hf_model, tiny_tokenizer
from test_sae import BatchTopKModule

from caft_jax.discovery import cli, cli_sae
from caft_jax.discovery import sae_train as T
from caft_jax.discovery.sae import load_batchtopk_sae
from caft_jax.errors import ConfigError


def test_batch_topk_mask_is_the_k_times_b_largest():
    rng = np.random.default_rng(0)
    post = np.maximum(rng.normal(size=(64, 256)), 0).astype(np.float32)
    for n_keep in (1, 64 * 8, 5000):
        mask = np.asarray(T.batch_topk_mask(jnp.asarray(post), n_keep))
        cut = np.sort(post.ravel())[-n_keep]
        np.testing.assert_array_equal(mask, (post >= cut) & (post > 0))
        assert mask.sum() == n_keep
    assert np.asarray(T.batch_topk_mask(jnp.asarray(post), post.size)).sum() == (post > 0).sum()  # all positives


def torch_losses(params, x, dead, k, auxk_alpha):
    """dictionary_learning's BatchTopK loss, written with torch.topk over the flattened batch."""
    W_enc, b_enc, W_dec, b_dec = (params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    post = torch.relu((x - b_dec) @ W_enc + b_enc)
    values, ids = post.flatten().topk(k * x.shape[0])
    f = torch.zeros_like(post.flatten()).scatter(0, ids, values).reshape(post.shape)
    x_hat = f @ W_dec + b_dec
    mse = ((x - x_hat) ** 2).sum(-1).mean()
    residual = (x - x_hat).detach()
    aux_values, aux_ids = torch.where(dead[None], post, torch.zeros_like(post)).topk(x.shape[1] // 2, dim=-1)
    dense = torch.zeros_like(post).scatter(-1, aux_ids, aux_values)
    aux = ((residual - dense @ W_dec) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()
    return mse + auxk_alpha * aux


def test_loss_and_gradients_equal_a_torch_reference():
    rng = np.random.default_rng(1)
    d, m, b, k = 16, 64, 32, 4
    x = rng.normal(size=(b, d)).astype(np.float32)
    params = {key: np.asarray(v) for key, v in T.init_params(T.jax.random.key(0), d, m, x.mean(0)).items()}
    params["b_enc"] = (0.1 * rng.normal(size=m)).astype(np.float32)
    dead = np.zeros(m, bool)
    dead[::3] = True
    jparams = {key: jnp.asarray(v) for key, v in params.items()}
    grads, stats = T.jax.grad(T._losses, has_aux=True)(jparams, jnp.asarray(x), jnp.asarray(dead), k, 1 / 32)
    loss = float(stats["mse"] + stats["aux"] / 32)
    tparams = {key: torch.tensor(v, dtype=torch.float64, requires_grad=True) for key, v in params.items()}
    reference = torch_losses(tparams, torch.tensor(x, dtype=torch.float64), torch.tensor(dead), k, 1 / 32)
    reference.backward()
    np.testing.assert_allclose(loss, reference.item(), rtol=1e-5)
    for key in params:
        np.testing.assert_allclose(np.asarray(grads[key]), tparams[key].grad.numpy(), rtol=1e-4, atol=1e-5)


def planted(rng, n, atoms, active=4):
    f = np.zeros((n, len(atoms)))
    for i in range(n):
        f[i, rng.choice(len(atoms), active, replace=False)] = rng.uniform(1, 3, active)
    return (f @ atoms + 0.5 + 0.01 * rng.normal(size=(n, atoms.shape[1]))).astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(64, 32))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    cfg = T.SAETrainConfig(dict_size=128, k=4, tokens=512 * 600, batch_tokens=512, buffer_tokens=8192,
                           warmup_steps=20, threshold_start=50, dead_tokens=20_000)  # fmt: skip
    chunks = ({0: planted(rng, 4096, atoms)} for _ in range(80))
    saes, curves = T.train_saes(T.shuffled_batches(chunks, [0], 512, 8192), [0], cfg, progress=False)
    out = T.save_dictionary_learning(saes[0], tmp_path_factory.mktemp("sae") / "layer_0", {"layer": 0})
    return {"sae": saes[0], "curve": curves[0], "atoms": atoms, "held_out": planted(rng, 4096, atoms), "dir": out}


def test_training_recovers_a_planted_dictionary(trained):
    sae, curve = trained["sae"], trained["curve"]
    assert curve[-1]["step"] == 599 and curve[-1]["fvu"] < 0.5 * curve[0]["fvu"]
    cos = (trained["atoms"] @ np.asarray(sae.W_dec).T).max(1)
    assert (cos > 0.9).mean() >= 0.85, np.sort(cos)[:8]
    quality = T.evaluate(sae, trained["held_out"])
    assert quality["explained_variance"] > 0.8 and 2 <= quality["l0"] <= 6


def test_report_numbers_equal_a_recomputation_from_the_torch_file(trained):
    """Explained variance, L0 and dead latents from torch.load's tensors in float64 numpy."""
    state = torch.load(trained["dir"] / "ae.pt", weights_only=True)
    x = trained["held_out"].astype(np.float64)
    post = np.maximum((x - state["b_dec"].double().numpy()) @ state["encoder.weight"].double().numpy().T
                      + state["encoder.bias"].double().numpy(), 0)  # fmt: skip
    f = post * (post > state["threshold"].item())
    x_hat = f @ state["decoder.weight"].double().numpy().T + state["b_dec"].double().numpy()
    quality = T.evaluate(trained["sae"], trained["held_out"])
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    np.testing.assert_allclose(quality["explained_variance"], ev, rtol=1e-4)
    np.testing.assert_allclose(quality["l0"], (f > 0).sum(1).mean(), rtol=1e-3)
    assert quality["dead_latents"] == int((~(f > 0).any(0)).sum())


def test_saved_files_are_dictionary_learning_batchtopk(trained):
    state = torch.load(trained["dir"] / "ae.pt", weights_only=True)
    module = BatchTopKModule(32, 128, 4)
    reference = module.state_dict()
    assert list(state) == list(reference)
    assert all(state[key].shape == reference[key].shape and state[key].dtype == reference[key].dtype for key in state)
    module.load_state_dict(state, strict=True)
    assert module.k.item() == 4 and module.threshold.item() > 0
    loaded = load_batchtopk_sae(trained["dir"])  # the reader `discover sae` uses
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        np.testing.assert_array_equal(np.asarray(getattr(loaded, name)), np.asarray(getattr(trained["sae"], name)))
    config = json.loads((trained["dir"] / "config.json").read_text())["trainer"]
    assert (config["dict_class"], config["activation_dim"], config["dict_size"], config["k"]) == (
        "BatchTopKSAE",
        32,
        128,
        4,
    )


def test_bad_settings_are_refused():
    for kwargs, message in (
        ({"k": 64, "dict_size": 64}, "smaller than dict_size"),
        ({"tokens": 100}, "no step"),
        ({"batch_tokens": 4096, "buffer_tokens": 1024}, "must hold one batch"),
    ):
        with pytest.raises(ConfigError, match=message):
            T.SAETrainConfig(**kwargs).check()
    with pytest.raises(ConfigError, match="below d_model"):
        T.SAETrainConfig(dict_size=64, k=4).check(d_model=576)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sae")
    save_hf_model("llama", root / "model", vocab_size=300)
    tiny_tokenizer().save_pretrained(root / "model")
    words = "the cat sat on a mat and then ran far away from every dog in town".split()
    rng = np.random.default_rng(0)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 20))}) + "\n" for _ in range(80)))
    return root


def test_train_sae_command_on_a_tiny_model(tiny, capsys):
    out = tiny / "saes"
    argv = ["train-sae", "--model", str(tiny / "model"), "--corpus", str(tiny / "corpus.jsonl"), "--layers", "0,2"]
    argv += ["--dict-size", "128", "--k", "8", "--tokens", "8192", "--batch-tokens", "256", "--out-dir", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "sae_report.json").read_text())
    assert sorted(report["layers"]) == ["0", "2"] and (out / "sae_training.png").stat().st_size > 0
    for layer in (0, 2):
        quality = report["layers"][str(layer)]["eval"]
        assert quality["n_tokens"] > 0 and quality["explained_variance"] < 1 and quality["l0"] > 0
        assert load_batchtopk_sae(out / f"layer_{layer}").d_sae == 128
    assert "explained variance" in capsys.readouterr().out
    assert cli.main(argv) == 2  # files of the run are not replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "7"], "layers [7] do not exist"),
        (["--layers", "0", "--k", "200"], "smaller than dict_size"),
        (["--layers", "0", "--eval-fraction", "0.001"], "too few to hold out"),
    ],
)
def test_train_sae_refuses_bad_input_before_loading(tiny, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(cli_sae, "model_and_tokenizer", lambda args: pytest.fail("the model was loaded"))
    argv = ["train-sae", "--model", str(tiny / "model"), "--corpus", str(tiny / "corpus.jsonl"), "--dict-size", "128",
            "--out-dir", str(tiny / "refused"), *extra]  # fmt: skip
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_small_corpus_is_captured_once_and_replayed():
    passes = []

    def one_pass():
        passes.append(1)
        yield from ({0: np.full((2, 4), i, np.float32)} for i in range(3))

    import itertools

    first = [int(c[0][0, 0]) for c in itertools.islice(T.replayed(one_pass, 10**6), 8)]
    assert first == [0, 1, 2, 0, 1, 2, 0, 1] and len(passes) == 1  # fits: replayed from memory
    passes.clear()
    again = [int(c[0][0, 0]) for c in itertools.islice(T.replayed(one_pass, 40), 8)]
    assert again == first and len(passes) == 3  # 3 chunks of 32 bytes do not fit in 40: captured anew
    assert list(T.replayed(lambda: iter([]), 100)) == []  # an empty corpus ends instead of looping


def test_texts_are_length_sorted_within_windows_only():
    texts = ["cccc", "a", "bbb", "dd", "eeeee", "f", "gg"]
    out = list(T.length_sorted_windows(texts, window=3))
    assert out == ["a", "bbb", "cccc", "f", "dd", "eeeee", "gg"]  # windows [0:3], [3:6], [6:]: each sorted
    assert sorted(out) == sorted(texts)  # nothing lost or repeated
    assert list(T.length_sorted_windows([], window=3)) == []
