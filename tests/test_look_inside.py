"""run_inference.py's views inside the model (chapter 8), checked against independent computations.

Alternatives against a plain softmax, the logit lens and the attention weights against Hugging Face
transformers' hidden states and attention weights, the memory report against the checkpoint file and
the KV-cache formula.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run_inference.py is a script at the repository root
    sys.path.insert(0, str(REPO_ROOT))

import run_inference  # noqa: E402
from hf_reference import hf_model_from_meta_checkpoint  # noqa: E402
from llama_models.llama3 import load_llama  # noqa: E402
from llama_models.llama3.quantize import fbgemm_available  # noqa: E402

PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]  # BOS + "Hello, world" as bytes


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    """(our float32 model, the transformers model, folder) for the tied-output gqa4 checkpoint."""
    folder = tiny_checkpoint("gqa4")
    model, _ = load_llama(folder, dtype=torch.float32, max_seq_len=32)
    reference = hf_model_from_meta_checkpoint(folder, rope_scale_factor=model.args.rope_scale_factor)
    return model, reference, folder


def test_alternatives_are_the_softmax_of_the_logits():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 3
    ids, probs, entropy_bits = run_inference.next_token_alternatives(logits, k=300)
    expected = torch.softmax(logits.double(), dim=-1)
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert probs == sorted(probs, reverse=True)
    assert torch.allclose(torch.tensor(probs, dtype=torch.float64), expected[ids], atol=1e-6)
    assert entropy_bits == pytest.approx(-(expected * expected.log2()).sum().item(), abs=1e-4)


def test_recorded_alternatives_follow_greedy_decoding(models):
    model, _, _ = models
    with run_inference.recording_alternatives(model, k=5) as recorded:
        steps = list(run_inference.greedy_decode(model, PROMPT, max_new_tokens=6))
    assert len(recorded) == len(steps) == 6  # one distribution per generated token, no extra forward
    for (token, probability), (ids, probs, _) in zip(steps, recorded):
        assert ids[0] == token  # greedy takes the top candidate
        assert probs[0] == pytest.approx(probability, rel=1e-5)
    assert model.output._forward_hooks == {}  # the hook is gone afterwards


def test_the_token_column_is_padded_by_terminal_columns():
    # Each East Asian wide character fills two columns and a combining accent none, so that the
    # alternatives after the text start in the same column on every row.
    for text, columns in [("'ab'", 4), ("'世界'", 6), ("'e\u0301'", 3)]:
        assert run_inference.padded(text, 16) == text + " " * (16 - columns)
    assert run_inference.padded("'a long token text'", 16) == "'a long token text'"  # never cut


def test_logit_lens_matches_transformers_hidden_states(models):
    model, reference, _ = models
    rows = run_inference.logit_lens(model, PROMPT)
    assert [layer for layer, _, _ in rows] == list(range(model.args.n_layers))

    own_logits = model(torch.tensor([PROMPT]), start_pos=0)[0, -1]
    assert rows[-1][1] == int(own_logits.argmax())  # after the last layer: the model's own prediction

    with torch.no_grad():
        hidden = reference(torch.tensor([PROMPT]), output_hidden_states=True).hidden_states
    # hidden[i + 1] is the residual stream after layer i (the last one already has the final norm applied).
    for layer, token, probability in rows[:-1]:
        logits = reference.lm_head(reference.model.norm(hidden[layer + 1][0, -1]))
        probs = torch.softmax(logits.float(), dim=-1)
        assert token == int(probs.argmax())
        assert probability == pytest.approx(probs.max().item(), rel=1e-4)


def test_logit_lens_of_a_prompt_in_chunks_reads_its_last_position(models, monkeypatch):
    """A long prompt is prefilled in chunks, and the hooks fire once per chunk: the last one counts."""
    model, _, _ = models
    whole = run_inference.logit_lens(model, PROMPT)
    monkeypatch.setattr(run_inference, "PREFILL_CHUNK", 5)  # 13 tokens: chunks of 5, 5 and 3
    chunked = run_inference.logit_lens(model, PROMPT)
    assert [row[:2] for row in chunked] == [row[:2] for row in whole]
    assert [row[2] for row in chunked] == pytest.approx([row[2] for row in whole], rel=1e-4)


def test_memory_report_counts_every_weight_once_and_the_kv_cache_by_its_formula(models):
    model, _, folder = models
    report = run_inference.memory_report(model)

    params = json.loads((folder / "params.json").read_text())
    stored = torch.load(folder / "consolidated.00.pth", weights_only=True)  # no output.weight: tied
    float32_bytes = sum(tensor.numel() * 4 for tensor in stored.values())
    assert sum(report["weights"].values()) == float32_bytes
    assert report["weights"]["output"] == 0
    assert report["weights"]["embedding"] == stored["tok_embeddings.weight"].numel() * 4

    head_dim = params["dim"] // params["n_heads"]
    expected_cache = 2 * params["n_layers"] * 1 * 32 * params["n_kv_heads"] * head_dim * 4  # batch 1, 32 positions
    assert report["kv_cache"] == expected_cache


def test_last_layer_attention_matches_transformers(models):
    model, reference, _ = models
    attention = run_inference.last_layer_attention(model, PROMPT)  # (heads, seq, seq)
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT]), output_attentions=True).attentions[-1][0]
    assert attention.shape == expected.shape == (model.args.n_heads, len(PROMPT), len(PROMPT))
    assert torch.allclose(attention.sum(dim=-1), torch.ones(model.args.n_heads, len(PROMPT)), atol=1e-5)
    assert (attention - expected).abs().max().item() < 1e-5


def test_attention_png_is_written(models, tmp_path):
    pytest.importorskip("matplotlib")  # optional: the settings' check says how to install it
    model, _, folder = models
    path = tmp_path / "attention.png"
    tokenizer = run_inference.Tokenizer(folder / "tokenizer.model")
    run_inference.save_attention_png(run_inference.last_layer_attention(model, PROMPT), tokenizer, PROMPT, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_shows_every_view(tiny_checkpoint, tmp_path):
    png = str(tmp_path / "a.png") if run_inference.matplotlib_installed() else None  # without it the settings' check refuses
    settings = ("import run_inference as r; r.MAX_NEW_TOKENS = 4; r.SHOW_PROMPT_TOKENS = True; "
                "r.SHOW_ALTERNATIVES = 3; r.SHOW_LOGIT_LENS = True; r.SHOW_MEMORY = True; "
                f"r.ATTENTION_PNG = {png!r}; r.main()")
    environment = os.environ | {"LLAMA_CHECKPOINT_DIR": str(tiny_checkpoint("gqa3")), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([sys.executable, "-c", settings], capture_output=True, text=True, timeout=120,
                              env=environment, cwd=REPO_ROOT)
    assert finished.returncode == 0, finished.stderr
    for heading in ("base64", "memory:", "KV cache", "logit lens", "entropy", "alternatives"):
        assert heading in finished.stdout
    assert finished.stdout.count("|") >= 4  # one alternatives column per generated token
    assert ("wrote" in finished.stdout) == (png is not None)


def test_attention_png_is_checked_before_anything_runs(monkeypatch, tmp_path):
    """A missing folder or a missing matplotlib: one line at the start, not a traceback after the answer."""
    monkeypatch.setattr(run_inference, "ATTENTION_PNG", str(tmp_path / "no-such-folder" / "a.png"))
    with pytest.raises(run_inference.LlamaError, match="no-such-folder does not exist"):
        run_inference.check_settings()
    for not_a_png in ("", str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a.txt")):  # matplotlib: a.png, a.txt fails
        monkeypatch.setattr(run_inference, "ATTENTION_PNG", not_a_png)
        with pytest.raises(run_inference.LlamaError, match="name a file ending in .png"):
            run_inference.check_settings()
    monkeypatch.setattr(run_inference, "ATTENTION_PNG", str(tmp_path / "a.png"))
    monkeypatch.setattr(run_inference, "matplotlib_installed", lambda: False)
    with pytest.raises(run_inference.LlamaError, match="matplotlib, which is not installed: pip install matplotlib"):
        run_inference.check_settings()


def test_profile_counts_each_parts_bytes_and_its_times_fit_in_the_step(tiny_checkpoint, fresh_choosers):
    """Bytes by their formulas (every weight once per step, the KV cache up to each step's position);
    times: no part negative, and the timed parts leave a non-negative rest of the step. The stated
    margin: on this tiny model the timed parts cover at least a third of the step (the rest is
    Python between modules and choosing the token, a larger share than in a real model)."""
    folder = tiny_checkpoint("gqa3")
    model, _ = load_llama(folder, dtype=torch.float32, max_seq_len=64)
    list(run_inference.greedy_decode(model, PROMPT, max_new_tokens=24))  # every kind of product chosen
    profile = run_inference.StepProfile(model)
    try:
        tokens = list(run_inference.greedy_decode(model, PROMPT, max_new_tokens=12))
    finally:
        profile.close()
    assert len(tokens) == 12 and len(profile.steps) == 10  # 11 decode steps, the last one incomplete
    rows = profile.summary()

    def weight_bytes(*suffixes):
        return sum(weight.nbytes for name, weight in model.named_parameters() if name.endswith(suffixes))

    assert rows["attention projections"][1] == weight_bytes(*(f"{w}.weight" for w in ("wq", "wk", "wv", "wo")))
    assert rows["feed-forward"][1] == weight_bytes(*(f"{w}.weight" for w in ("w1", "w2", "w3")))
    assert rows["output layer"][1] == model.output.weight.nbytes
    args = model.args
    # Complete steps at positions len(PROMPT) .. len(PROMPT) + 9 read kv_len = position + 1 entries.
    mean_kv_len = len(PROMPT) + 1 + 4.5
    cache_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 4 * mean_kv_len
    assert rows["attention"][1] == pytest.approx(cache_bytes)
    assert model.output._forward_hooks == {} and model.tok_embeddings._forward_pre_hooks == {}

    step_seconds = rows["step"][0]
    timed = sum(seconds for part, (seconds, _) in rows.items() if part in run_inference.PROFILE_PARTS)
    assert all(rows[part][0] >= 0 for part in run_inference.PROFILE_PARTS)
    assert 0 <= rows["rest"][0] and timed <= step_seconds
    assert timed >= step_seconds / 3


@pytest.mark.parametrize("scheme", ["int4", "fp16"])
def test_profile_counts_the_bytes_of_quantized_and_packed_matrices(tiny_checkpoint, fresh_choosers, scheme):
    if scheme == "fp16" and not fbgemm_available():
        pytest.skip("fp16 packs for fbgemm, which only x86 builds of PyTorch have")
    model, _ = load_llama(tiny_checkpoint("gqa3"), max_seq_len=64, quantize=scheme)
    summary = profile_after_the_trials(model)
    feed_forward = [getattr(layer.feed_forward, w).weight for layer in model.layers for w in ("w1", "w2", "w3")]
    assert summary["feed-forward"][1] == sum(weight.nbytes for weight in feed_forward) > 0


def profile_after_the_trials(model) -> dict:
    """The profile's summary of 6 decoded tokens, once fresh choosers have chosen every kernel."""
    list(run_inference.greedy_decode(model, PROMPT, max_new_tokens=24))
    profile = run_inference.StepProfile(model)
    try:
        list(run_inference.greedy_decode(model, PROMPT, max_new_tokens=6))
    finally:
        profile.close()
    return profile.summary()


def test_profile_counts_what_a_tied_int4_output_layer_reads(tiny_checkpoint, fresh_choosers):
    """Quantized at load, Llama 3.2's shared matrix keeps its codes (for lookups) beside the kernel's
    layout; a product reads the layout and the scales only."""
    model, _ = load_llama(tiny_checkpoint("gqa4"), max_seq_len=64, quantize="int4")
    output = model.output.weight
    assert output.codes is not None and output.packed is not None
    read = profile_after_the_trials(model)["output layer"][1]
    assert read == output.packed.nbytes + output.scales_and_zeros.nbytes < output.nbytes


def test_profile_leaves_out_the_steps_in_which_kernels_are_timed(tiny_checkpoint, fresh_choosers):
    model, _ = load_llama(tiny_checkpoint("gqa3"), dtype=torch.float32, max_seq_len=64)
    profile = run_inference.StepProfile(model)
    try:
        list(run_inference.greedy_decode(model, PROMPT, max_new_tokens=12))
    finally:
        profile.close()
    assert 0 < len(profile.steps) < 10  # the first decode steps ran trials of the one-row candidates


def test_script_shows_the_profile_with_the_kernels_chosen(tiny_checkpoint):
    settings = "import run_inference as r; r.MAX_NEW_TOKENS = 24; r.SHOW_PROFILE = True; r.main()"
    environment = os.environ | {"LLAMA_CHECKPOINT_DIR": str(tiny_checkpoint("gqa4")), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([sys.executable, "-c", settings], capture_output=True, text=True, timeout=120,
                              env=environment, cwd=REPO_ROOT)
    assert finished.returncode == 0, finished.stderr
    assert "where a decode step's time goes" in finished.stdout
    table = finished.stdout.split("where a decode step's time goes")[1]
    for part in run_inference.PROFILE_PARTS + ("rest", "step"):
        assert f"\n  {part} " in table
    # 23 decode steps are enough trials for every one-row kind: each product names the kernel chosen.
    feed_forward = next(line for line in table.splitlines() if line.startswith("  feed-forward"))
    kernels = feed_forward.split("%", 1)[1].strip()  # e.g. "F.linear (w1, w3); torch.mv (w2)"
    names = {kernel.name for kernel in run_inference.products.CPU_KERNELS}
    assert all(used.split(" (")[0] in names for used in kernels.split("; ")), kernels
    assert all(weight in kernels for weight in ("w1", "w2", "w3"))
    attention = next(line for line in table.splitlines() if line.split()[:1] == ["attention"]
                     and line.split()[1] != "projections")
    chosen = attention.split(None, 3)[-1]  # after the part, ms and MiB: under a MiB read, no GB/s columns
    attention_names = {kernel.name for kernel in run_inference.products.ATTENTION_KERNELS}
    assert all(used.split(" (cached <= ")[0] in attention_names for used in chosen.split("; ")), chosen
