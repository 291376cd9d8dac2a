"""Feature displays (top contexts, HTML/JSON report) and selection into ablation specs, incl. autointerp."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from fake_openai import FakeOpenAI
from hf_models import tiny_tokenizer

from caft_jax import Capture, ModelSpec, build_projector, init_model, jit_forward
from caft_jax.ablation_spec import load_ablation_spec
from caft_jax.discovery.autointerp import autointerp_client, autointerp_scores, from_autointerp
from caft_jax.discovery.concept_fit import fit_concept
from caft_jax.discovery.corpus import iter_texts
from caft_jax.discovery.display_report import (
    Context,
    FeatureDisplay,
    load_display_json,
    render_html,
    write_display_report,
)
from caft_jax.discovery.displays import latent_encoder, top_contexts, top_contexts_by_layer
from caft_jax.discovery.pca import pca_exact
from caft_jax.discovery.sae import make_sae
from caft_jax.discovery.select import (
    Selection,
    SelectionError,
    from_concepts,
    from_selection_file,
    probe_guided,
    random_latents,
    random_orthonormal,
    random_pcs_like,
    read_selection,
    top_k_latents,
    top_k_pcs,
)

TEXTS = [
    "Hello world, how are you?",
    "I am fine, thank you.",
    "Answer: A",
    "import os\nprint(1)\n",
    "Answer: B and then a few more words to read",
    "a <b>tag</b> & an ampersand",
    "thank you, world",
    "how are you, Answer: A",
    "print(os)",
    "hi",
]
LAYER = 1


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    spec = ModelSpec(
        family="llama", vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
    )
    return init_model(spec, seed=0), tok


def reference_values(model, tok, features):
    """Brute force: every text in one left-padded batch (unlike the streamed buckets), values per real token."""
    ids = [tok(t)["input_ids"] for t in TEXTS]
    t = max(map(len, ids))
    tokens = np.zeros((len(ids), t), np.int32)
    mask = np.zeros((len(ids), t), bool)
    for r, x in enumerate(ids):
        tokens[r, t - len(x) :], mask[r, t - len(x) :] = x, True
    out = jit_forward(model, jnp.asarray(tokens), attn_mask=jnp.asarray(mask), capture=Capture((LAYER,)), logits=False)
    acts = np.asarray(out.captured[0], np.float64)
    per_text = [acts[r, t - len(x) :] for r, x in enumerate(ids)]  # [len, d] per text
    return ids, per_text, [features(a) for a in per_text]


def expected_order(values, sign):
    """Texts ordered by their extreme value (ignoring each text's first token), with the peak positions."""
    best = [(sign * v[1:]).max() if len(v) > 1 else -np.inf for v in values]
    peaks = [int(np.argmax(sign * v[1:])) + 1 if len(v) > 1 else -1 for v in values]
    order = [i for i in np.argsort(-np.asarray(best), kind="stable") if np.isfinite(best[i])]
    return order, peaks


def test_top_contexts_match_brute_force(tiny):
    model, tok = tiny
    rng = np.random.default_rng(0)
    ids, acts, _ = reference_values(model, tok, lambda a: a)
    # plant: feature 0 is the activation of the largest-norm token (first tokens excluded); no other token can
    # project onto it more than its own norm, so its max context must be that token.
    norms = [np.linalg.norm(a[1:], axis=-1) for a in acts]
    text_star = int(np.argmax([n.max(initial=-1) for n in norms]))
    pos_star = int(np.argmax(norms[text_star])) + 1
    directions = np.stack([acts[text_star][pos_star], *rng.normal(size=(2, 32))])
    k, window = 4, 6
    displays = top_contexts(
        model, tok, TEXTS, LAYER, directions, k=k, window=window, batch_size=4, max_len=64, progress=False,
        scores=[0.5, 0.2, 0.1], score_name="explained_variance_ratio",
    )  # fmt: skip
    assert [(f.layer, f.index, f.kind) for f in displays] == [(LAYER, i, "pc") for i in range(3)]
    top = displays[0].max_contexts[0]
    assert (top.text_index, top.position) == (text_star, pos_star)
    assert top.token_ids[top.peak] == ids[text_star][pos_star]

    values = [a @ directions.T for a in acts]  # [len, F] per text
    for f, display in enumerate(displays):
        for sign, contexts in ((1.0, display.max_contexts), (-1.0, display.min_contexts)):
            order, peaks = expected_order([v[:, f] for v in values], sign)
            assert [c.text_index for c in contexts] == order[:k]
            for c in contexts:
                text, p = c.text_index, peaks[c.text_index]
                assert c.position == p
                assert c.peak_value == pytest.approx(values[text][p, f], abs=1e-4)
                start = max(0, p - c.peak)
                assert c.token_ids == ids[text][start : start + len(c.token_ids)]
                np.testing.assert_allclose(c.values, values[text][start : start + len(c.values), f], atol=1e-4)
                assert len(c.tokens) <= window and c.tokens[c.peak] == tok.decode([ids[text][p]])
    # an SAE-like encoder: non-negative latents, max side only
    w = rng.normal(size=(32, 5))
    encoder = lambda x: np.maximum(np.asarray(x) @ w, 0.0)  # noqa: E731
    latents = top_contexts_by_layer(
        model, tok, iter(TEXTS), {LAYER: encoder}, k=3, window=window, batch_size=4, max_len=64, progress=False,
        feature_ids={LAYER: [10, 11, 12, 13, 14]},
    )  # fmt: skip
    assert [f.index for f in latents] == [10, 11, 12, 13, 14] and all(f.kind == "latent" for f in latents)
    for f, display in enumerate(latents):
        assert display.min_contexts == []
        order, _ = expected_order([encoder(a)[:, f] for a in acts], 1.0)
        got = [c.text_index for c in display.max_contexts]
        expected_values = [encoder(acts[i])[1:, f].max() for i in order[:3]]
        np.testing.assert_allclose([c.peak_value for c in display.max_contexts], expected_values, atol=1e-4)
        assert got == order[:3] or np.allclose(expected_values, 0.0)  # ties at zero may order either way


def test_sae_latent_displays(tiny):
    model, tok = tiny
    rng = np.random.default_rng(3)
    w_enc = rng.normal(size=(32, 40)).astype(np.float32)
    sae = make_sae(w_enc, np.zeros(40), w_enc.T, np.zeros(32), rng.random(40) * 0.2, kind="jumprelu")
    ids = [3, 17, 29]
    sub = latent_encoder(sae, ids)
    x = rng.normal(size=(7, 32)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(sub.encode(x)), np.asarray(sae.encode(x))[:, ids], rtol=1e-5)
    displays = top_contexts(
        model, tok, TEXTS, LAYER, sub, k=2, feature_ids=ids, scores=[0.3, 0.2, 0.1], score_name="attribution",
        batch_size=4, max_len=64, progress=False,
    )  # fmt: skip
    _, acts, _ = reference_values(model, tok, lambda a: a)
    codes = np.asarray(sae.encode(np.concatenate([a[1:] for a in acts]).astype(np.float32)))  # one call, one shape
    codes = np.split(codes, np.cumsum([len(a) - 1 for a in acts])[:-1])
    for f, display in zip(ids, displays, strict=True):
        assert (display.index, display.kind, display.min_contexts) == (f, "latent", [])
        best = sorted((c[:, f].max() for c in codes), reverse=True)
        np.testing.assert_allclose([c.peak_value for c in display.max_contexts], best[:2], atol=1e-4)


def test_report_is_self_contained_and_json_matches(tiny, tmp_path):
    model, tok = tiny
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert list(iter_texts(corpus)) == TEXTS
    txt = tmp_path / "corpus.txt"
    txt.write_text("first doc\nline two\n\nsecond doc\n\n\nthird\n")
    assert list(iter_texts(txt)) == ["first doc\nline two", "second doc", "third"]
    directions = np.random.default_rng(1).normal(size=(2, 32))
    displays = top_contexts(
        model, tok, corpus, LAYER, directions, k=3, window=8, batch_size=4, max_len=64, progress=False,
        scores=[0.3, 0.1], score_name="explained_variance_ratio",
    )  # fmt: skip
    paths = write_display_report(displays, tmp_path / "run", title="PCs <layer 1>")
    page = paths["html"].read_text(encoding="utf-8")
    assert not re.search(r"https?:|src=|<link|@import|url\(", page, re.IGNORECASE)  # nothing outside the file
    assert page.count("<script>") == 1  # the one inline script: search and the layer filter
    n_extremes = sum(len(f.max_contexts) + len(f.min_contexts) for f in displays)
    n_contexts = n_extremes + sum(len(f.quantile_contexts) for f in displays)
    assert n_extremes == 12 and page.count('class="tok peak"') == n_contexts
    assert "PCs &lt;layer 1&gt;" in page
    for f in displays:
        assert f.selection_hint == f'"{LAYER}": [{f.index}]'
        assert f'id="L{LAYER}-F{f.index}"' in page and "&quot;1&quot;: [" in page
        assert "explained_variance_ratio = " in page and "sign +" in page and "sign \u2212" in page
    payload = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert payload["title"] == "PCs <layer 1>"
    assert payload["features"] == [f.to_dict() for f in displays]
    assert load_display_json(paths["json"]) == displays
    # the peak span holds the peak token's text
    peak = displays[0].max_contexts[0]
    assert re.search(r'class="tok peak"[^>]*>([^<]*)<', page).group(1) != ""
    assert isinstance(peak, Context)


def pcs_source(n_layers=3, n=20, d=32, seed=0):
    rng = np.random.default_rng(seed)
    return {layer: np.linalg.qr(rng.normal(size=(d, n)))[0].T for layer in range(n_layers)}


def test_selection_file_roundtrip_and_baselines(tmp_path):
    pcs = pcs_source()
    sel_path = tmp_path / "selection.json"
    sel_path.write_text(json.dumps({"0": [3, 1], "2": [0], "1": []}))
    assert read_selection(sel_path) == {0: [3, 1], 2: [0], 1: []}
    chosen = from_selection_file(pcs, sel_path)
    assert chosen.counts() == {0: 2, 2: 1}
    np.testing.assert_allclose(chosen.directions[0], pcs[0][[3, 1]], atol=1e-6)
    spec_path = chosen.save(tmp_path / "spec.safetensors")
    directions, means, meta = load_ablation_spec(spec_path)
    assert sorted(directions) == [0, 2] and means == {}
    assert meta["source"] == "selection_file" and meta["ids"] == {"0": [3, 1], "2": [0]}
    projector = build_projector(directions, 3, 32)
    assert list(projector.ranks()) == [2, 0, 1]
    # a spec that `discover select` wrote (e.g. an autointerp choice) reads back as its ids
    assert read_selection(spec_path) == {0: [3, 1], 2: [0]}
    np.testing.assert_array_equal(from_selection_file(pcs, spec_path).directions[0], chosen.directions[0])
    random_orthonormal(32, {0: 1}).save(tmp_path / "no_ids.safetensors")
    with pytest.raises(SelectionError, match="no ids of the candidates"):
        read_selection(tmp_path / "no_ids.safetensors")

    # a PCAResult works as a candidate source too
    data = np.random.default_rng(1).normal(size=(200, 16))
    from_pca = from_selection_file({5: pca_exact(data, 4)}, {"5": [2]})
    np.testing.assert_allclose(from_pca.directions[5], pca_exact(data, 4).components[[2]], atol=1e-6)

    top = top_k_pcs(pcs, 5)
    assert top.counts() == {0: 5, 1: 5, 2: 5} and top.ids[1] == [0, 1, 2, 3, 4]
    assert top.metadata == {"source": "top_k_pcs", "k": 5}

    like = random_pcs_like(pcs, {"0": [1, 2, 3], "2": [7]}, seed=1)
    assert like.counts() == {0: 3, 2: 1}
    assert all(len(set(ids)) == len(ids) and max(ids) < 20 for ids in like.ids.values())
    assert random_pcs_like(pcs, chosen, seed=1).counts() == chosen.counts()
    assert random_pcs_like(pcs, like, seed=1).ids == random_pcs_like(pcs, like, seed=1).ids
    seeds = {tuple(random_pcs_like(pcs, {"0": [0, 1, 2]}, seed=s).ids[0]) for s in range(6)}
    assert len(seeds) > 1

    ortho = random_orthonormal(32, {0: 4, 3: 2}, seed=2)
    assert ortho.counts() == {0: 4, 3: 2} and ortho.ids is None
    for rows in ortho.directions.values():
        np.testing.assert_allclose(rows @ rows.T, np.eye(len(rows)), atol=1e-6)
    assert not np.allclose(random_orthonormal(32, {0: 4}, seed=3).directions[0], ortho.directions[0])

    with pytest.raises(SelectionError, match="out of range"):
        from_selection_file(pcs, {"0": [25]})
    with pytest.raises(SelectionError, match="not a layer number"):
        read_selection({"layer0": [1]})
    with pytest.raises(SelectionError, match="distinct"):
        read_selection({"0": [1, 1]})
    with pytest.raises(SelectionError, match="only 20 are in the pool"):
        random_pcs_like(pcs, {"0": list(range(21))})
    with pytest.raises(SelectionError, match="empty"):
        Selection({}).save(tmp_path / "empty.safetensors")


def test_latent_baselines():
    rng = np.random.default_rng(4)
    decoders = {layer: rng.normal(size=(300, 16)) for layer in (2, 5)}
    effects = {layer: rng.normal(size=300) for layer in (2, 5)}
    top = top_k_latents(decoders, effects, k=10)
    for layer in (2, 5):
        assert top.ids[layer] == [int(i) for i in np.argsort(-effects[layer])[:10]]
        np.testing.assert_allclose(top.directions[layer], decoders[layer][top.ids[layer]], atol=1e-6)
    glob = top_k_latents(decoders, effects, k=10, per_layer=False)
    assert sum(glob.counts().values()) == 10
    flat = sorted((-effects[la][i], la, i) for la in (2, 5) for i in range(300))[:10]
    assert sorted((la, i) for _, la, i in flat) == sorted((la, i) for la, ids in glob.ids.items() for i in ids)

    rand = random_latents(decoders, effects, k=7, seed=0, pool=50)
    for layer in (2, 5):
        pool = set(np.argsort(-effects[layer])[:50].tolist())
        assert len(rand.ids[layer]) == 7 and set(rand.ids[layer]) <= pool
    assert random_latents(decoders, effects, seed=0, like=top).counts() == top.counts()


def planted_candidates(seed=0):
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(16, 6)))[0].T  # [6, 16] orthonormal candidates
    y = rng.integers(0, 2, 600)
    acts = rng.normal(size=(600, 16)) + 2.5 * y[:, None] * q[3]  # only candidate 3 carries the concept
    return q, acts, y


def test_probe_guided_keeps_the_separating_direction(tmp_path):
    q, acts, y = planted_candidates()
    flipped = q.copy()
    flipped[3] *= -1  # the sign of a PC is arbitrary: both signs separate
    for cands in (q, flipped):
        sel = probe_guided({4: cands}, {4: acts}, y, threshold=0.7, means={4: acts.mean(0)})
        assert sel.ids == {4: [3]}
        aucs = sel.metadata["auc"][4]
        assert aucs[3] > 0.9 and max(aucs[:3] + aucs[4:]) < 0.6
    assert set(sel.means) == {4}
    _, means, meta = load_ablation_spec(sel.save(tmp_path / "probe.npz"))
    assert 4 in means and meta["source"] == "probe_guided" and meta["threshold"] == 0.7
    with pytest.raises(SelectionError, match="threshold"):
        probe_guided({4: q}, {4: acts}, y, threshold=0.2)


def test_separation_aucs_equal_sklearn_and_the_null_keeps_chance_out():
    from sklearn.metrics import roc_auc_score

    from caft_jax.discovery.select import null_threshold, separation_aucs

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 20))
    x[:6, 3] = x[6:12, 3]  # ties get average ranks, as in sklearn
    for y in (rng.integers(0, 2, 64), rng.integers(0, 3, 64)):
        expected = [
            max(
                abs(roc_auc_score(y == c, x[:, j]) - 0.5) + 0.5
                for c in (np.unique(y)[1:] if y.max() == 1 else (0, 1, 2))
            )
            for j in range(20)
        ]
        np.testing.assert_allclose(separation_aucs(x, y), expected, atol=1e-12)
    # pure noise, 64 items, 20 candidates at each of 10 layers: with a label of 8 values (the verb forms an MCMC
    # item used to carry) the best one-vs-rest AUC of noise is ~0.93, so the fixed 0.7 keeps half the candidates
    noise_layers = {layer: rng.normal(size=(64, 32)) for layer in range(10)}
    candidates = {layer: np.linalg.qr(rng.normal(size=(32, 20)))[0].T for layer in range(10)}
    kept = {}
    for n_values in (2, 8):
        y = rng.integers(0, n_values, 64)
        fixed = probe_guided(candidates, noise_layers, y, threshold=0.7)
        calibrated = probe_guided(candidates, noise_layers, y, threshold=0.7, permutations=300)
        kept[n_values] = (sum(map(len, fixed.ids.values())), sum(map(len, calibrated.ids.values())))
        nulls = list(calibrated.metadata["null_threshold"].values())
        assert all((0.68 < v < 0.76) if n_values == 2 else (0.88 < v < 0.97) for v in nulls), nulls
    assert kept[8][0] >= 50 and kept[8][1] <= 3 and kept[2][1] <= 3  # 5% of layers may pass by chance
    layer0 = noise_layers[0] @ candidates[0].T
    assert null_threshold(layer0, y, permutations=300, seed=0) == pytest.approx(
        calibrated.metadata["null_threshold"][0], abs=1e-6
    )
    q, acts, labels = planted_candidates()  # a real separating direction still passes
    assert probe_guided({4: q}, {4: acts}, labels, threshold=0.7, permutations=300).ids == {4: [3]}


def test_concept_selection_with_means(tmp_path):
    rng = np.random.default_rng(6)
    u = np.linalg.qr(rng.normal(size=(16, 1)))[0][:, 0]
    y = rng.integers(0, 2, 100)
    acts = rng.normal(size=(100, 6, 16)) + 2.0 * y[:, None, None] * u
    erasures = {3: fit_concept(acts, y), 7: fit_concept(acts, y, method="leace")}
    sel = from_concepts(erasures, mean_ablation=True)
    directions, means, meta = load_ablation_spec(sel.save(tmp_path / "concept.safetensors"))
    assert sorted(directions) == sorted(means) == [3, 7]
    assert meta["source"] == "concept" and meta["mean_ablation"] is True
    assert meta["layers"]["3"]["method"] == "class_mean" and "outliers" in meta["layers"]["3"]
    assert abs(directions[3][0] @ u) / np.linalg.norm(directions[3][0]) > 0.95


def fake_feature(layer, index, word, n=3):
    ctx = [Context(i, 2, ["The", f" {word}", " here"], [1, 2, 3], [0.1, 2.0, 0.3], 1, 2.0) for i in range(n)]
    return FeatureDisplay(layer, index, "pc", 0.1, "explained_variance_ratio", ctx, ctx[:1])


def test_autointerp_keeps_features_scoring_above_threshold(tmp_path, monkeypatch):
    features = [fake_feature(0, 0, "football"), fake_feature(0, 1, "banana"), fake_feature(2, 4, "tennis")]
    scores = {"football": 92, "banana": 8, "tennis": 75}

    def handler(request):
        text = request["messages"][-1]["content"]
        if "What does this feature respond to?" in text:  # explanation request: name the peak word
            word = re.search(r"<<\s*(\w+)>>", text).group(1)
            return f"mentions of {word}", None
        word = re.search(r"mentions of (\w+)", text).group(1)
        if word == "tennis":  # no usable logprobs: the number in the answer text is used
            return "75", [("seventy", -0.1)]
        s = scores[word]
        return str(s), [(str(s), -0.05), (str(s - 5), -3.5), ("x", -6.0)]

    with FakeOpenAI(handler) as server:
        monkeypatch.setenv("CAFT_AUTOINTERP_BASE_URL", server.base_url)
        monkeypatch.setenv("CAFT_AUTOINTERP_MODEL", "fake-explainer")
        monkeypatch.setenv("FAKE_KEY", "sk-test")
        client = autointerp_client(api_key_env="FAKE_KEY", cache_path=tmp_path / "cache.jsonl")
        records = autointerp_scores(features, "Sports, e.g. football or tennis.", client)
        # explain the + and - side of each feature (6); score each explanation (both sides of a feature are
        # explained "mentions of <word>", so the 6 score requests are 3 distinct ones, each sent once)
        assert len(server.requests) == 9
        assert all(r["model"] == "fake-explainer" for r in server.requests)
        assert server.auth_headers[0] == "Bearer sk-test"
    assert [(r["layer"], r["index"], r["sign"]) for r in records] == [
        (0, 0, "+"), (0, 0, "-"), (0, 1, "+"), (0, 1, "-"), (2, 4, "+"), (2, 4, "-"),
    ]  # fmt: skip
    by_feature = {(r["layer"], r["index"]): r["score"] for r in records}
    assert 88 < by_feature[(0, 0)] < 92 and by_feature[(0, 1)] < 10 and by_feature[(2, 4)] == 75
    assert records[0]["explanation"] == "mentions of football"

    pcs = {0: np.eye(16)[:5], 2: np.eye(16)[5:]}
    sel = from_autointerp(pcs, records, threshold=70, rubric="sports", model="fake-explainer")
    assert sel.ids == {0: [0], 2: [4]}
    np.testing.assert_allclose(sel.directions[2], np.eye(16)[[9]])
    meta = load_ablation_spec(sel.save(tmp_path / "auto.safetensors"))[2]
    assert meta["source"] == "autointerp" and len(meta["records"]) == 6 and meta["threshold"] == 70
    assert from_autointerp(pcs, records, threshold=80).ids == {0: [0]}


def test_autointerp_timeout_must_be_positive(tmp_path, capsys):
    from caft_jax.discovery.cli import main as discover
    from caft_jax.discovery.display_report import write_display_report
    from caft_jax.discovery.pca import pca_exact, save_pca

    pca = save_pca(tmp_path / "pca.safetensors", {0: pca_exact(np.random.default_rng(0).normal(size=(32, 16)), 3)})
    displays = write_display_report([fake_feature(0, 0, "football")], tmp_path)["json"]
    argv = ["select", "--pca", str(pca), "--autointerp", "sports", "--displays", str(displays),
            "--autointerp-timeout", "0", "--out-dir", str(tmp_path / "sel")]  # fmt: skip
    assert discover(argv) == 2
    assert "--autointerp-timeout must be a positive number of seconds; got 0.0" in capsys.readouterr().err


def test_histogram_quantile_contexts_and_token_effects_match_brute_force(tiny):
    """The corpus is small enough for both random samples to hold everything, so each equals its exact value."""
    model, tok = tiny
    directions = np.random.default_rng(5).normal(size=(2, 32))
    displays = top_contexts(model, tok, TEXTS, LAYER, directions, k=3, window=6, batch_size=4, max_len=64,
                            progress=False)  # fmt: skip
    _, acts, _ = reference_values(model, tok, lambda a: a)
    values = [a[1:] @ directions.T for a in acts]  # every token but each text's first
    flat = np.concatenate(values)
    tied = model.spec.tie_embeddings
    head = np.asarray(model.params["table"] if tied else model.params["lm_head"], np.float64)  # [V, d] or [d, V]
    head = head.T if tied else head
    norm = np.asarray(model.params["final_norm"], np.float64)
    for f, display in enumerate(displays):
        counts, edges = np.histogram(flat[:, f], bins=30)
        hist = display.histogram
        assert hist["counts"] == counts.tolist() and hist["n_tokens"] == len(flat)
        np.testing.assert_allclose(hist["edges"], edges, rtol=1e-5)
        assert hist["mean"] == pytest.approx(flat[:, f].mean(), abs=1e-5)
        assert hist["positive_fraction"] == pytest.approx((flat[:, f] > 0).mean())
        peaks = sorted(v[:, f].max() for v in values if len(v))
        want = [peaks[min(int(q * len(peaks)), len(peaks) - 1)] for q in (0.1, 0.25, 0.5, 0.75, 0.9)]
        got = {q: c.peak_value for q, c in display.quantile_contexts}
        assert len(got) == len(display.quantile_contexts) >= 4  # quantiles landing on the same text show it once
        for q, value in got.items():
            assert value == pytest.approx(want[[0.1, 0.25, 0.5, 0.75, 0.9].index(q)], abs=1e-4)
        d = directions[f]
        logits = (d / np.sqrt(np.mean(d**2) + model.spec.norm_eps) * (model.spec.norm_offset + norm)) @ head
        assert [t for t, _ in display.promoted_tokens] == [tok.decode([i]) for i in np.argsort(-logits)[:10]]
        assert [t for t, _ in display.suppressed_tokens] == [tok.decode([i]) for i in np.argsort(logits)[:10]]
        np.testing.assert_allclose([v for _, v in display.promoted_tokens], np.sort(logits)[::-1][:10], rtol=1e-4)


def _browser():
    import shutil

    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(
    _browser() is None, reason="no Chromium on this machine (scripts/test.sh installs it where apt can)"
)
def test_report_renders_in_headless_chromium(tiny, tmp_path):
    """The page a researcher opens: every section is in the rendered DOM, and the search box (prefilled from the
    address, as a shared link would) hides the features that do not match."""
    from caft_jax.discovery.display_report import projection_contrast, with_explanations

    model, tok = tiny
    rng = np.random.default_rng(2)
    directions = rng.normal(size=(3, 32))
    displays = top_contexts(model, tok, TEXTS, LAYER, directions, k=3, window=8, batch_size=4, max_len=64,
                            progress=False)  # fmt: skip
    records = [{"layer": LAYER, "index": 1, "sign": "+", "explanation": "greetings such as hello", "score": 80.0}]
    displays = with_explanations(displays, records)
    base, tuned = rng.normal(size=(50, 32)), rng.normal(size=(50, 32)) + directions[0] / 4
    displays[0].contrast = projection_contrast(base, tuned, directions[0] / np.linalg.norm(directions[0]))
    page = write_display_report(displays, tmp_path, title="browser check")["html"]

    def dom(fragment: str, screenshot: str | None = None) -> str:
        args = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=2000"]
        if screenshot:
            args += [f"--screenshot={screenshot}", "--window-size=1280,2400"]
        else:
            args += ["--dump-dom"]
        out = subprocess.run([*args, f"file://{page}#{fragment}"], capture_output=True, text=True, timeout=120)
        return out.stdout

    full = dom("")
    for section in ("activation histogram", "through the unembedding", "contexts at quantiles", "base vs fine-tuned",
                    "autointerp:</b> +: greetings such as hello", "max-activating", "min-activating"):  # fmt: skip
        assert section in full, section
    assert "3 of 3 features shown" in full and full.count('<svg class="hist"') == 4
    filtered = dom("q=greetings")
    assert "1 of 3 features shown" in filtered
    hidden = re.findall(r'<section class="feature" id="L1-F(\d)"[^>]*style="display: none;"', filtered)
    assert sorted(hidden) == ["0", "2"]
    shot = tmp_path / "displays.png"
    dom("", screenshot=str(shot))
    assert shot.stat().st_size > 10_000  # a rendered page, not an empty canvas
    if os.environ.get("CAFT_KEEP_SCREENSHOT"):
        import shutil

        shutil.copy(shot, os.environ["CAFT_KEEP_SCREENSHOT"])


def test_render_html_escapes_tokens_and_handles_empty_features():
    ctx = Context(0, 1, ["a", "<b>&", "\n"], [5, 6, 7], [0.5, -1.0, 0.0], 1, -1.0)
    page = render_html(
        [FeatureDisplay(3, 7, "latent", 1.5, "attribution"), FeatureDisplay(4, 2, "pc", None, None, [ctx])]
    )
    assert "no contexts" in page and "&quot;3&quot;: [7]" in page and "attribution = 1.5" in page
    assert "<b>" not in page and '<span class="tok peak" style="background:rgba(40,90,220,0.800)"' in page
    assert ">&lt;b&gt;&amp;</span>" in page and "\u21b5" in page  # escaped peak token; newline shown as a glyph


def test_example_discovery_corpus_is_one_text_per_record(tmp_path):
    """scripts/example_discovery.sh writes its display corpus as one JSON string per line (a .txt corpus would be
    split on blank lines only, so one text per line would read as a single document): every record is a text."""

    script = open(os.path.join(os.path.dirname(__file__), "..", "scripts", "example_discovery.sh")).read()
    snippet = script[script.index('python -c "\nimport json') : script.index('" > $RUN/corpus.jsonl')]
    chats = tmp_path / "chats.jsonl"
    source = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "emergent_misalignment")
    lines = open(os.path.join(source, "insecure_small_subset_2000.jsonl")).read().splitlines()[:64]
    chats.write_text("\n".join(lines) + "\n")
    code = snippet[len('python -c "') :].replace("$RUN", str(tmp_path))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    texts = list(iter_texts(corpus))
    assert len(texts) == 64
    assert texts[5] == json.loads(lines[5])["messages"][0]["content"][:400]
