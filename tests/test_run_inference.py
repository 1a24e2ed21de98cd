"""run_inference.py: its decoding functions against independent references, and the script as a user runs it.

The references are written here from the definitions: greedy is the argmax of a full forward pass
(no KV cache) repeated token by token; beam search is Hugging Face transformers' `generate`; top-p is
Meta's rule written out in float64 Python. The script itself runs as a subprocess, as a user would
start it, on tiny random checkpoints with the byte-level tokenizer (one token per UTF-8 byte).
"""

import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

# run_inference.py and minimal_run_inference.py are scripts at the repository root, not part of a
# package: put the root on sys.path so `import run_inference` works whatever the current directory.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import run_inference  # noqa: E402
from checkpoints import TINY_SHAPES, folder_snapshot  # noqa: E402
from hf_reference import hf_model_from_meta_checkpoint  # noqa: E402
from tokenizer_files import write_byte_level_tokenizer  # noqa: E402
from llama_models import quantize as quantize_tool  # noqa: E402
from llama_models.llama3 import ModelArgs, Tokenizer, load_llama  # noqa: E402

MAX_SEQ_LEN = 64  # prompts below are at most 11 tokens, generations at most 12
MAX_BATCH_SIZE = 4  # the widest beam below
SUBPROCESS_TIMEOUT = 120


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from several threads, and lose a lot when the CPU is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def float32_model(tiny_checkpoint):
    """float32_model("gqa4") -> (model, tokenizer, folder), loaded once per module in float32."""
    loaded = {}

    def load(shape_name: str = "gqa4"):
        if shape_name not in loaded:
            folder = tiny_checkpoint(shape_name)
            model, tokenizer = load_llama(
                folder, dtype=torch.float32, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH_SIZE
            )
            loaded[shape_name] = (model, tokenizer, folder)
        return loaded[shape_name]

    return load


def random_prompts(count: int, seed: int, lengths=(5, 8, 11)) -> list:
    """Prompts of byte tokens (ids below 256: ordinary text bytes for the tiny tokenizer)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (lengths[i % len(lengths)],), generator=generator).tolist() for i in range(count)]


def full_forward_logits(model, tokens: list) -> torch.Tensor:
    """Logits for the next token from one full pass over `tokens` (start_pos=0: no cached state used)."""
    return model(torch.tensor([tokens]), start_pos=0)[0, -1].float()


def greedy_without_cache(model, prompt: list, max_new_tokens: int) -> list:
    """The definition of greedy decoding: re-run the whole text each step and take the argmax."""
    tokens, generated = list(prompt), []
    for _ in range(max_new_tokens):
        logits = full_forward_logits(model, tokens)
        token = int(logits.argmax())
        generated.append((token, float(torch.softmax(logits, dim=-1)[token])))
        tokens.append(token)
    return generated


# ------------------------------------------------------------------------------------------------
# Greedy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_name", ["gqa1", "gqa4"])
def test_greedy_equals_argmax_of_full_forwards(float32_model, shape_name):
    model, _, _ = float32_model(shape_name)
    for prompt in random_prompts(3, seed=10):
        # Consume the generator fully before the reference runs: both use cache row 0.
        ours = list(run_inference.greedy_decode(model, prompt, 12, stop_tokens=frozenset()))
        reference = greedy_without_cache(model, prompt, 12)
        assert [token for token, _ in ours] == [token for token, _ in reference]
        for (_, our_probability), (_, probability) in zip(ours, reference):
            assert our_probability == pytest.approx(probability, rel=1e-4, abs=1e-7)


def test_greedy_stops_before_a_stop_token(float32_model):
    model, _, _ = float32_model("gqa4")
    prompt = random_prompts(1, seed=11)[0]
    unstopped = [token for token, _ in greedy_without_cache(model, prompt, 10)]
    stop = unstopped[5]
    ours = [token for token, _ in run_inference.greedy_decode(model, prompt, 10, stop_tokens=frozenset({stop}))]
    assert ours == unstopped[: unstopped.index(stop)]  # the stop token itself is not yielded


# ------------------------------------------------------------------------------------------------
# Beam search
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_width_one_equals_greedy(float32_model, length_penalty):
    model, _, _ = float32_model("gqa4")
    for prompt in random_prompts(2, seed=12):
        greedy = greedy_without_cache(model, prompt, 9)
        beams = run_inference.beam_search(model, prompt, 1, 9, frozenset(), length_penalty)
        assert len(beams) == 1
        tokens, score = beams[0]
        assert tokens == [token for token, _ in greedy]
        assert len(tokens) == 9
        log_probability = sum(math.log(probability) for _, probability in greedy)
        assert score == pytest.approx(log_probability / 9**length_penalty, rel=1e-4)


def test_beam_width_one_with_stop_token_ends_with_it(float32_model):
    """Greedy leaves the stop token out; a finished beam hypothesis keeps it as its last token."""
    model, _, _ = float32_model("gqa4")
    prompt = random_prompts(1, seed=13)[0]
    unstopped = [token for token, _ in greedy_without_cache(model, prompt, 10)]
    stop = unstopped[4]
    greedy = [token for token, _ in run_inference.greedy_decode(model, prompt, 10, frozenset({stop}))]
    [(tokens, _)] = run_inference.beam_search(model, prompt, 1, 10, frozenset({stop}), 1.0)
    assert tokens == greedy + [stop]
    assert len(tokens) < 10


@pytest.mark.parametrize("prompt, message", [
    ([256, 512], "token id 512 is outside the vocabulary"), ([256, -1], "token id -1 is outside the vocabulary"),
    ([], "the prompt must be a list of at least one token id"), ("hello", "the prompt must be a list"),
    (torch.tensor([256, 72]), "the prompt must be a list"), ([256, 72.0], "the prompt must be a list"),
])
def test_a_prompt_that_is_not_token_ids_is_named(float32_model, prompt, message):
    """The embedding reads an id outside the vocabulary as zeros and would go on silently."""
    model, _, _ = float32_model("gqa4")
    with pytest.raises(run_inference.LlamaError, match=message):
        list(run_inference.greedy_decode(model, prompt, 3))


@pytest.mark.parametrize("temperature, top_p, seed, message", [
    *[(temperature, top_p, 1, "the temperature must be a number of 0 or more, top_p one between 0 and 1")
      for temperature, top_p in [(-1.0, 0.9), (float("nan"), 0.9), ("0.7", 0.9), (0.6, 1.5), (0.6, float("nan"))]],
    *[(0.6, 0.9, seed, "it must be a whole number from -2[*][*]63 to 2[*][*]64 - 1") for seed in (2**64, 1.5, None)],
])
def test_sample_names_a_temperature_top_p_or_seed_out_of_range(float32_model, temperature, top_p, seed, message):
    """The script checks its settings; a caller of sample() would get PyTorch's multinomial error, with
    top_p NaN no cut at all, or with a seed of 2**64 PyTorch's overflow."""
    model, _, _ = float32_model("gqa4")
    with pytest.raises(run_inference.LlamaError, match=message):
        list(run_inference.sample(model, [256, 72], 3, frozenset(), temperature, top_p, seed=seed))


def test_beam_search_wider_than_the_cache_and_a_negative_position_are_named(float32_model):
    model, _, _ = float32_model("gqa4")
    with pytest.raises(run_inference.LlamaError, match=f"beam_width={MAX_BATCH_SIZE + 1}: it must be between 1 and"):
        run_inference.beam_search(model, [256, 72], MAX_BATCH_SIZE + 1, 3, frozenset(), 1.0)
    with pytest.raises(run_inference.LlamaError, match="start_pos=-3"):
        model(torch.tensor([[72]]), start_pos=-3)


def test_beam_progress_counts_the_steps_and_erases_its_line(float32_model, capsys):
    model, _, _ = float32_model("gqa4")
    prompt = random_prompts(1, seed=13)[0]
    with run_inference.beam_progress(model, 6, shown=True):
        [(tokens, _)] = run_inference.beam_search(model, prompt, 1, 6, frozenset(), 1.0)
    error = capsys.readouterr().err
    assert "\r(beam search: step 1 of at most 6)" in error and "step 6 of at most 6" in error  # prefill + 5
    assert error.endswith("\r" + " " * len("(beam search: step 6 of at most 6)") + "\r")
    assert model.output._forward_hooks == {}
    with run_inference.beam_progress(model, 6, shown=False):  # not on a terminal: nothing
        run_inference.beam_search(model, prompt, 1, 6, frozenset(), 1.0)
    assert capsys.readouterr().err == ""


def hf_beam_search(hf, prompt, width, max_new_tokens, stop_tokens, length_penalty, pad_id):
    """Hugging Face's beam search as [(generated tokens, score)], best first, like ours."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=width,
            num_return_sequences=width,
            do_sample=False,
            length_penalty=length_penalty,
            early_stopping=True,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(stop_tokens) or None,
            pad_token_id=pad_id,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    # No logits processor may have changed anything: the scores HF ranks by are plain log-softmax.
    for raw, processed in zip(out.logits, out.scores):
        assert torch.allclose(processed, torch.log_softmax(raw.float(), dim=-1), atol=1e-6)
    hypotheses = []
    for sequence, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        generated = sequence[len(prompt) :]
        ends = [i for i, token in enumerate(generated) if token in stop_tokens]
        if ends:  # finished by a stop token: the rest is padding
            assert all(token == pad_id for token in generated[ends[0] + 1 :])
            generated = generated[: ends[0] + 1]
        else:  # finished by length
            assert len(generated) == max_new_tokens
        hypotheses.append((generated, score))
    return hypotheses


def fake_model_with_caches(max_batch: int, kv_heads: int, max_seq: int, head_dim: int, layers: int = 2):
    """Just what reorder_kv_cache touches: model.layers[i].attention.cache_k / cache_v, filled with
    values that say where they came from."""
    def cache():
        return torch.randn(max_batch, kv_heads, max_seq, head_dim)

    attentions = [types.SimpleNamespace(cache_k=cache(), cache_v=cache()) for _ in range(layers)]
    return types.SimpleNamespace(layers=[types.SimpleNamespace(attention=a) for a in attentions])


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_reorder_kv_cache_copies_parent_rows(width):
    """Every parent list of `width` beams (swaps, repeated parents, nothing moved): row b becomes the
    old row parent[b] in the first `length` positions; later positions and rows past `width` stay."""
    length = 5
    for parents in itertools.product(range(width), repeat=width):
        model = fake_model_with_caches(max_batch=5, kv_heads=2, max_seq=8, head_dim=3)
        before = [(layer.attention.cache_k.clone(), layer.attention.cache_v.clone()) for layer in model.layers]
        run_inference.reorder_kv_cache(model, torch.tensor(parents), length)
        for layer, old_caches in zip(model.layers, before):
            for new, old in zip((layer.attention.cache_k, layer.attention.cache_v), old_caches):
                expected = old.clone()
                expected[:width, :, :length] = old[list(parents), :, :length]
                assert torch.equal(new, expected), parents


@pytest.mark.parametrize("shape_name", ["gqa3", "gqa4"])
def test_beam_search_equals_transformers(float32_model, shape_name):
    model, tokenizer, folder = float32_model(shape_name)
    hf = hf_model_from_meta_checkpoint(folder, rope_scale_factor=model.args.rope_scale_factor)
    max_new_tokens = 10
    finished_early = mixed_lengths = 0
    for prompt in random_prompts(3, seed=14):
        # Stop tokens the random model actually produces: its favourite next tokens a few greedy
        # steps in (after 2 steps and after 4), so that hypotheses end at different lengths.
        greedy = [token for token, _ in greedy_without_cache(model, prompt, 4)]
        stop_sets = [frozenset()]
        for steps in (2, 4):
            stop_sets.append(frozenset(full_forward_logits(model, prompt + greedy[:steps]).topk(3).indices.tolist()))
        for stop_tokens in stop_sets:
            for width, length_penalty in [(2, 1.0), (3, 0.5), (4, 2.0), (4, 1.0)]:
                label = f"prompt {prompt}, width {width}, length_penalty {length_penalty}, stop {sorted(stop_tokens)}"
                ours = run_inference.beam_search(model, prompt, width, max_new_tokens, stop_tokens, length_penalty)
                theirs = hf_beam_search(
                    hf, prompt, width, max_new_tokens, stop_tokens, length_penalty, tokenizer.pad_id
                )
                assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in theirs], label
                for (_, our_score), (_, score) in zip(ours, theirs):
                    assert our_score == pytest.approx(score, abs=1e-4), label
                scores = [score for _, score in ours]
                assert scores == sorted(scores, reverse=True), label
                for tokens, _ in ours:  # a hypothesis shorter than the limit ends with a stop token
                    assert len(tokens) == max_new_tokens or tokens[-1] in stop_tokens, label
                    assert not any(token in stop_tokens for token in tokens[:-1]), label
                lengths = {len(tokens) for tokens, _ in ours}
                finished_early += min(lengths) < max_new_tokens
                mixed_lengths += len(lengths) > 1
    assert finished_early > 0  # the stop-token path was exercised ...
    assert mixed_lengths > 0  # ... including length-penalised ranking of different lengths


# ------------------------------------------------------------------------------------------------
# Top-p and sampling
# ------------------------------------------------------------------------------------------------


def top_p_reference(probs: list, top_p: float) -> list:
    """Meta's rule in float64: walk from most to least likely; keep a token while the probability
    before it is at most top_p. Returns, per token, its mass before it in that order."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    mass_before, total = [0.0] * len(probs), 0.0
    for i in order:
        mass_before[i] = total
        total += probs[i]
    return mass_before


@pytest.mark.parametrize("top_p", [0.0, 0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_top_p_keeps_what_the_reference_rule_keeps(top_p):
    generator = torch.Generator().manual_seed(15)
    for sharpness in (0.5, 2.0, 5.0):
        probs = torch.softmax(sharpness * torch.randn(512, generator=generator), dim=-1)
        original = probs.clone()
        filtered = run_inference.top_p_filter(probs, top_p)
        assert torch.equal(probs, original)  # the input is left alone
        mass_before = top_p_reference(probs.double().tolist(), top_p)
        # float32 sums decide tokens whose preceding mass is within rounding of top_p (at top_p = 1,
        # the long tail of a sharp distribution); every other token must be decided as the rule says.
        decided = [i for i, mass in enumerate(mass_before) if abs(mass - top_p) > 1e-5]
        assert len(decided) > 100
        for i in decided:
            assert (filtered[i] > 0) == (mass_before[i] <= top_p), (i, mass_before[i])
        kept = filtered > 0
        assert kept[int(probs.argmax())]  # the most likely token is always kept
        assert torch.allclose(filtered[kept], probs[kept] / probs[kept].sum(), rtol=1e-5)
        assert torch.all(filtered[~kept] == 0)
        assert float(filtered.sum()) == pytest.approx(1.0, abs=1e-5)


def test_top_p_example_from_the_facts_file():
    filtered = run_inference.top_p_filter(torch.tensor([0.5, 0.3, 0.15, 0.05]), 0.9)
    assert torch.allclose(filtered, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_sample_draws_from_the_temperature_scaled_nucleus(float32_model):
    """The first sampled token lies in the top-p set of softmax(logits / T), with that set's renormalised
    probability, and different seeds do draw different tokens from it."""
    model, _, _ = float32_model("gqa4")
    prompt = random_prompts(1, seed=16)[0]
    temperature, top_p = 0.8, 0.5
    probs = torch.softmax(full_forward_logits(model, prompt) / temperature, dim=-1).double()
    mass_before = top_p_reference(probs.tolist(), top_p)
    nucleus = {i for i, mass in enumerate(mass_before) if mass <= top_p}
    nucleus_mass = sum(float(probs[i]) for i in nucleus)
    assert len(nucleus) >= 5
    drawn = set()
    for seed in range(30):
        [(token, probability)] = run_inference.sample(model, prompt, 1, frozenset(), temperature, top_p, seed)
        assert token in nucleus
        assert probability == pytest.approx(float(probs[token]) / nucleus_mass, rel=1e-4)
        drawn.add(token)
    assert len(drawn) >= 3


def test_fixed_seed_reproduces_the_same_tokens(float32_model):
    model, _, _ = float32_model("gqa4")
    prompt = random_prompts(1, seed=17)[0]

    def sampled(seed):
        return list(run_inference.sample(model, prompt, 12, frozenset(), temperature=1.5, top_p=1.0, seed=seed))

    first, again, other = sampled(3), sampled(3), sampled(4)
    assert len(first) == 12
    assert first == again
    assert [token for token, _ in first] != [token for token, _ in other]


def test_sample_with_temperature_zero_or_tiny_top_p_is_greedy(float32_model):
    model, _, _ = float32_model("gqa4")
    prompt = random_prompts(1, seed=18)[0]
    greedy = greedy_without_cache(model, prompt, 8)
    cold = list(run_inference.sample(model, prompt, 8, frozenset(), temperature=0.0, top_p=0.9, seed=5))
    assert [token for token, _ in cold] == [token for token, _ in greedy]
    assert all(probability == 1.0 for _, probability in cold)  # drawn with certainty, as p(drawn) shows
    # top_p = 0 leaves only the most likely token, drawn with probability 1
    narrow = list(run_inference.sample(model, prompt, 8, frozenset(), temperature=1.0, top_p=0.0, seed=5))
    assert [token for token, _ in narrow] == [token for token, _ in greedy]
    assert all(probability == pytest.approx(1.0) for _, probability in narrow)
    # a temperature so small that the scores divided by it overflow float32: still the most likely token
    frozen = list(run_inference.sample(model, prompt, 8, frozenset(), temperature=1e-300, top_p=0.9, seed=5))
    assert [token for token, _ in frozen] == [token for token, _ in greedy]


# ------------------------------------------------------------------------------------------------
# Streaming text
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme, kernel", [("int8", True), ("int4", False), ("int4", "emulated")])
def test_the_line_off_the_cpu_names_what_multiplies_quantized_matrices(tiny_checkpoint, request, scheme, kernel):
    """The CPU stands in for a GPU: its PyTorch has the int8 kernel, and not the int4 one unless a
    stand-in for CUDA's is patched in."""
    if kernel == "emulated":
        request.getfixturevalue("emulated_tinygemm")
    else:
        request.getfixturevalue("fresh_probes")
    model, _ = load_llama(tiny_checkpoint("gqa4"), max_seq_len=16, quantize=scheme)
    line = run_inference.how_quantized_matrices_multiply(model, scheme, torch.device("cpu"), torch.bfloat16)
    if kernel:
        assert line.startswith(f"(on cpu the {scheme} matrices are multiplied by PyTorch's {scheme} kernel")
        assert ("dequantized where that is faster" in line) == (scheme == "int8")  # int4 lets go of its codes
    else:
        assert "dequantized for every product, as this PyTorch has no int4 kernel for torch.bfloat16" in line


def test_streaming_prints_multi_byte_characters_whole(tiny_checkpoint, capsys):
    tokenizer = Tokenizer(tiny_checkpoint("gqa4") / "tokenizer.model")
    text = "héllo 🦙"
    tokens = tokenizer.encode(text, bos=False, eos=False)
    assert len(tokens) == len(text.encode("utf-8")) > len(text)  # é and 🦙 are split over several tokens
    streamed = run_inference.Streamed()
    run_inference.stream_tokens([(token, 1.0) for token in tokens], tokenizer, show_tokens=False, streamed=streamed)
    assert capsys.readouterr().out == text + "\n"
    assert streamed.tokens == tokens
    assert streamed.first_token_time is not None


def test_a_probability_too_small_for_two_decimals_is_not_shown_as_zero():
    assert [run_inference.percent(p) for p in (0.0, 1e-9, 0.00005, 0.5)] == ["0.00%", "<0.01%", "0.01%", "50.00%"]


def test_streaming_shows_control_characters_escaped(tiny_checkpoint, capsys):
    """An escape sequence or a carriage return in the text would act on the terminal."""
    tokenizer = Tokenizer(tiny_checkpoint("gqa4") / "tokenizer.model")
    tokens = tokenizer.encode("a\x1b[2Jb\rc\td\ne", bos=False, eos=False)
    run_inference.stream_tokens([(token, 1.0) for token in tokens], tokenizer, False, run_inference.Streamed())
    assert capsys.readouterr().out == "a\\x1b[2Jb\\x0dc\td\ne\n"


def test_token_table_shows_partial_characters_as_bytes(tiny_checkpoint, capsys):
    tokenizer = Tokenizer(tiny_checkpoint("gqa4") / "tokenizer.model")
    tokens = tokenizer.encode("é🦙", bos=False, eos=False)  # 2 + 4 bytes, none valid UTF-8 alone
    run_inference.stream_tokens([(token, 0.25) for token in tokens], tokenizer, True, run_inference.Streamed())
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 1 + len(tokens)  # header, one row per token
    assert "\ufffd" not in "".join(rows)
    for step, (row, token, byte) in enumerate(zip(rows[1:], tokens, "é🦙".encode("utf-8")), start=1):
        assert row.split()[:3] == [str(step), str(token), "25.00%"]
        assert repr(bytes([byte])) in row


# ------------------------------------------------------------------------------------------------
# The scripts, run as a user runs them
# ------------------------------------------------------------------------------------------------


def run_python(arguments: list, checkpoint=None, variables: dict = {}) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **variables}  # as `one_thread` above, for the scripts
    environment.pop("LLAMA_CHECKPOINT_DIR", None)
    if checkpoint is not None:
        environment["LLAMA_CHECKPOINT_DIR"] = str(checkpoint)
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


def with_settings(settings: str, then: str = "r.main()") -> list:
    """`python -c` arguments that import the script, change its settings, and run it."""
    return ["-c", f"import run_inference as r\n{settings}\n{then}"]


def assert_ran_cleanly(finished: subprocess.CompletedProcess) -> None:
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    assert "error:" not in finished.stderr


def test_run_inference_script_runs_with_its_defaults(tiny_checkpoint):
    folder = tiny_checkpoint("gqa4")
    before = folder_snapshot(folder)
    finished = run_python(["run_inference.py"], checkpoint=folder)
    assert_ran_cleanly(finished)
    shape = TINY_SHAPES["gqa4"]
    assert f"{folder.name}: {shape['n_layers']} layers, dim {shape['dim']}" in finished.stdout
    assert re.search(r"^prompt: \d+ tokens, generated: \d+ tokens$", finished.stdout, re.MULTILINE)
    assert folder_snapshot(folder) == before


def test_run_inference_script_beam_and_sample_modes(tiny_checkpoint):
    folder = tiny_checkpoint("gqa4")
    before = folder_snapshot(folder)
    settings = (
        "r.MAX_NEW_TOKENS = 8\nr.DTYPE = 'float32'\n"
        "r.DECODING = 'beam'\nr.BEAM_WIDTH = 3\nr.main()\nprint('=== next run ===')\n"
        "r.DECODING = 'sample'\nr.SHOW_TOKENS = True\nr.SHOW_PROMPT_TOKENS = True\nr.IS_INSTRUCT = True\nr.SYSTEM_PROMPT = 'Be brief.'\n"
    )
    finished = run_python(with_settings(settings), checkpoint=folder)
    assert_ran_cleanly(finished)
    beam, sampled = finished.stdout.split("=== next run ===")
    assert re.findall(r"^--- beam (\d+):", beam, re.MULTILINE) == ["1", "2", "3"]
    assert re.search(r"^prompt: \d+ tokens, \d+ beam steps of width 3 in ", beam, re.MULTILINE)
    assert "tokenizer.model holds lines of" in sampled
    assert re.search(r"^\s+0\s+\d+\s+\(special\)\s+'<\|begin_of_text\|>'$", sampled, re.MULTILINE)  # prompt table
    assert sampled.count("'<|start_header_id|>'") == 3  # system, user and assistant headers
    assert re.search(r"^\s+step\s+id\s+p\(drawn\)\s+text$", sampled, re.MULTILINE)  # sampled: after TEMPERATURE, TOP_P
    assert re.search(r"^prompt: \d+ tokens, generated: \d+ tokens$", sampled, re.MULTILINE)
    assert folder_snapshot(folder) == before


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp16"])
def test_run_inference_script_quantizes(tiny_checkpoint, scheme):
    finished = run_python(with_settings(f"r.QUANTIZE = {scheme!r}\nr.SHOW_MEMORY = True\nr.MAX_NEW_TOKENS = 6"),
                          checkpoint=tiny_checkpoint("gqa4"))
    assert_ran_cleanly(finished)
    progress = "packing for fbgemm's fp16 product: " if scheme == "fp16" else f"quantizing to {scheme}: "
    assert progress in finished.stdout and f"({scheme} matrices)" in finished.stdout
    assert re.search(r"^prompt: \d+ tokens, generated: \d+ tokens$", finished.stdout, re.MULTILINE)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_both_scripts_run_a_folder_the_quantize_tool_wrote(tiny_checkpoint, tmp_path, scheme):
    """Loaded as it lies, nothing quantized again; the same text as quantizing at load (greedy)."""
    folder = tmp_path / scheme
    assert quantize_tool.main([str(tiny_checkpoint("gqa4")), str(folder), scheme]) == 0
    before = folder_snapshot(folder)
    settings = "r.MAX_NEW_TOKENS = 6"
    from_folder = run_python(with_settings(settings), checkpoint=folder)
    assert_ran_cleanly(from_folder)
    assert "quantizing" not in from_folder.stdout and f"({scheme} matrices)" in from_folder.stdout
    at_load = run_python(with_settings(f"{settings}\nr.QUANTIZE = {scheme!r}"), checkpoint=tiny_checkpoint("gqa4"))
    assert_ran_cleanly(at_load)

    def answer(stdout: str) -> str:
        return stdout.split("\n\n", 1)[1].split("\nprompt:")[0]

    assert answer(from_folder.stdout) == answer(at_load.stdout)
    minimal = run_python(["minimal_run_inference.py"], checkpoint=folder)
    assert_ran_cleanly(minimal)
    assert re.search(r"^\d+ tokens in [\d.]+ s, the prompt's prefill included$", minimal.stdout, re.MULTILINE)
    other = "int4" if scheme == "int8" else "int8"
    refused = run_python(with_settings(f"r.QUANTIZE = {other!r}"), checkpoint=folder)
    assert refused.returncode != 0 and f"holds {scheme} weights" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert folder_snapshot(folder) == before


def test_minimal_run_inference_script_runs(tiny_checkpoint):
    folder = tiny_checkpoint("gqa4")
    before = folder_snapshot(folder)
    finished = run_python(["minimal_run_inference.py"], checkpoint=folder)
    assert_ran_cleanly(finished)
    assert re.search(r"^\d+ tokens in [\d.]+ s, the prompt's prefill included$", finished.stdout, re.MULTILINE)  # its one timing line
    assert "initializing model parallel" not in finished.stdout  # fairscale's banner is kept quiet
    assert folder_snapshot(folder) == before


ERROR_CASES = {
    "missing checkpoint": ("", "no-such-folder"),
    "unknown device": ("r.DEVICE = 'tpu'", "tpu"),
    "empty prompt": ("r.INPUT_STRING = '   '", "INPUT_STRING"),
    # gqa1 has use_scaled_rope false: an 8192-token context. The byte-level tokenizer makes one token
    # per byte, plus <|begin_of_text|>.
    "prompt longer than the context": ("r.INPUT_STRING = 'a ' * 5000", f"{len(('a ' * 5000).encode()) + 1} tokens"),
    "invalid decoding": ("r.DECODING = 'nucleus'", "nucleus"),
    "text for a number": ("r.MAX_NEW_TOKENS = '10'", "MAX_NEW_TOKENS = '10'"),
    "a word for a switch": ("r.IS_INSTRUCT = 'no'", "IS_INSTRUCT = 'no'"),
    "a dtype that is not a float": ("r.DTYPE = r.torch.int8", "torch.int8"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_settings_end_with_a_one_line_error(tiny_checkpoint, tmp_path, case):
    settings, culprit = ERROR_CASES[case]
    folder = tiny_checkpoint("gqa1")
    before = folder_snapshot(folder)
    checkpoint = tmp_path / "no-such-folder" if case == "missing checkpoint" else folder
    finished = run_python(with_settings(settings), checkpoint=checkpoint)
    assert finished.returncode != 0
    assert "Traceback" not in finished.stderr + finished.stdout
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    assert lines[0].startswith("error: ")
    assert culprit in lines[0]
    assert folder_snapshot(folder) == before
    assert not checkpoint.exists() or checkpoint == folder  # nothing was created either


SETTINGS_OF_THE_WRONG_KIND = [
    ("MAX_NEW_TOKENS", "10"), ("MAX_NEW_TOKENS", 2.5), ("MAX_NEW_TOKENS", 0), ("BEAM_WIDTH", True),
    ("SEED", "abc"), ("SEED", 2**70), ("SHOW_ALTERNATIVES", True), ("SHOW_ALTERNATIVES", -1), ("TEMPERATURE", "0.6"),
    ("TEMPERATURE", -1), ("TOP_P", 1.5), ("TOP_P", float("nan")), ("LENGTH_PENALTY", None),
    ("LENGTH_PENALTY", 400), ("LENGTH_PENALTY", -400), ("LENGTH_PENALTY", float("inf")), ("TEMPERATURE", 10**400),
    ("INPUT_STRING", None), ("SYSTEM_PROMPT", 3), ("MODEL_NAME", None), ("IS_INSTRUCT", "no"),
    ("SHOW_MEMORY", "yes"), ("SHOW_PROFILE", 1), ("ATTENTION_PNG", True), ("DECODING", None),
    ("QUANTIZE", "int3"), ("QUANTIZE", True),
]


@pytest.mark.parametrize("name, value", SETTINGS_OF_THE_WRONG_KIND, ids=lambda v: repr(v))
def test_each_setting_of_the_wrong_kind_is_named(monkeypatch, name, value):
    monkeypatch.setattr(run_inference, name, value)
    with pytest.raises(run_inference.LlamaError, match=f"^{name} = "):
        run_inference.check_settings()


@pytest.mark.parametrize("settings, instruct, named", [
    ({"DECODING": "beam", "SHOW_TOKENS": True, "SHOW_ALTERNATIVES": 3}, True, ["SHOW_TOKENS", "SHOW_ALTERNATIVES"]),
    ({"CHAT": True, "SHOW_LOGIT_LENS": True, "CHAT_CONTEXT": 10**6}, True, ["SHOW_LOGIT_LENS", "CHAT_CONTEXT"]),
    ({"SYSTEM_PROMPT": "Be brief."}, False, ["SYSTEM_PROMPT"]),
    ({"SYSTEM_PROMPT": "Be brief.", "DECODING": "beam", "SHOW_MEMORY": True}, True, []),
    ({"CHAT": True, "SHOW_TOKENS": True, "SHOW_PROFILE": True, "CHAT_CONTEXT": 4096}, True, []),
])
def test_settings_that_the_others_leave_unused_get_a_note(monkeypatch, settings, instruct, named):
    for name, value in settings.items():
        monkeypatch.setattr(run_inference, name, value)
    notes = run_inference.unused_settings(instruct, trained_context=131072)
    assert [note.split(" = ")[0] for note in notes] == named


def test_the_script_prints_the_note(tiny_checkpoint):
    finished = run_python(with_settings("r.DECODING = 'beam'\nr.SHOW_TOKENS = True\nr.MAX_NEW_TOKENS = 4"),
                          checkpoint=tiny_checkpoint("gqa4"))
    assert_ran_cleanly(finished)
    assert "note: SHOW_TOKENS = True shows greedy or sampled tokens" in finished.stdout


def chapter_1_settings() -> list:
    """The names the Settings chapter assigns, read from the script's text."""
    text = Path(run_inference.__file__).read_text()
    chapter = text[text.index("# 1. Settings"):text.index("# Each setting's kind")]
    return re.findall(r"^([A-Z][A-Z0-9_]*) = ", chapter, flags=re.MULTILINE)


@pytest.mark.parametrize("name", chapter_1_settings())
def test_every_setting_has_its_kind_checked(monkeypatch, name):
    """A setting added to chapter 1 but to none of check_settings' tables would go unchecked."""
    monkeypatch.setattr(run_inference, name, object())  # of no setting's kind
    with pytest.raises(run_inference.LlamaError, match=f"^{name} = "):
        run_inference.check_settings()


@pytest.mark.parametrize("typo, meant", [("DECODNG", "DECODING"), ("TOP_K", "TOP_P"), ("MAX_TOKENS", "MAX_NEW_TOKENS"),
                                         ("decoding", "DECODING")])
def test_a_misspelled_setting_is_named_not_ignored(monkeypatch, typo, meant):
    monkeypatch.setattr(run_inference, typo, "beam", raising=False)
    with pytest.raises(run_inference.LlamaError, match=rf"^{typo} is not a setting \(did you mean {meant}\?\)"):
        run_inference.check_settings()


def test_a_name_of_ones_own_or_the_environment_variable_as_a_setting(monkeypatch):
    monkeypatch.setattr(run_inference, "INPUT_STRING_2", "another prompt", raising=False)  # extends a setting's name
    run_inference.check_settings()
    monkeypatch.setattr(run_inference, "LLAMA_CHECKPOINT_DIR", "~/Llama3.2-1B", raising=False)
    with pytest.raises(run_inference.LlamaError, match="^LLAMA_CHECKPOINT_DIR is an environment variable, not a setting"):
        run_inference.check_settings()


def test_a_setting_whose_line_is_gone_is_named(monkeypatch):
    monkeypatch.delattr(run_inference, "DECODING")  # a NameError deep inside, else
    with pytest.raises(run_inference.LlamaError, match="^the setting DECODING is missing from chapter 1"):
        run_inference.check_settings()


def test_the_default_settings_pass_their_check():
    run_inference.check_settings()  # raises if a default were of the wrong kind


def test_command_line_arguments_point_to_the_settings():
    finished = run_python(["run_inference.py", "--help"])
    assert finished.returncode == 1
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and "no command-line arguments (got --help)" in lines[0]
    assert "settings at the top of the file" in lines[0] and "LLAMA_CHECKPOINT_DIR" in lines[0]


@pytest.mark.parametrize("script", ["run_inference.py", "minimal_run_inference.py"])
def test_an_interrupt_exits_with_code_130(tiny_checkpoint, script):
    """Ctrl-C raises KeyboardInterrupt wherever the script is: here where it picks the device. The
    script runs as a user runs it (as __main__) and ends without a traceback."""
    code = ("import runpy\nimport llama_models.llama3.devices as devices\n"
            "def interrupted(*args):\n    raise KeyboardInterrupt\n"
            f"devices.resolve_device = interrupted\nrunpy.run_path({script!r}, run_name='__main__')")
    finished = run_python(["-c", code], checkpoint=tiny_checkpoint("gqa4"))
    assert finished.returncode == 130, finished.stderr
    assert finished.stderr.strip() == "interrupted"


@pytest.mark.parametrize("script", ["run_inference.py", "minimal_run_inference.py"])
def test_an_interrupt_while_torch_imports_exits_with_code_130(tmp_path, script):
    """A stand-in torch whose import is interrupted (a real SIGINT, as Ctrl-C sends): no traceback."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\n")
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    finished = subprocess.run([sys.executable, script], cwd=REPO_ROOT, env=environment, capture_output=True,
                              text=True, timeout=SUBPROCESS_TIMEOUT)
    assert finished.returncode == 130, finished.stderr
    assert "Traceback" not in finished.stderr


@pytest.mark.parametrize("setting, value", [("MAX_NEW_TOKENS", "0"), ("MAX_NEW_TOKENS", "'10'"),
                                            ("MAX_NEW_TOKENS", "2.5"), ("INPUT_STRING", "None"),
                                            ("MODEL_NAME", "None"), ("LLAMA_MODELS_DIR", "3")])
def test_minimal_script_names_a_setting_of_the_wrong_kind(tiny_checkpoint, setting, value):
    code = (f"import sys, minimal_run_inference as m\nm.{setting} = {value}\n"
            "try:\n    m.main()\nexcept m.LlamaError as error:\n    sys.exit(f'error: {error}')")
    finished = run_python(["-c", code], checkpoint=tiny_checkpoint("gqa4"))
    assert finished.returncode == 1
    assert finished.stderr.strip().startswith(f"error: {setting} = {value}: write ")


def test_minimal_script_names_both_culprits_of_an_answer_beyond_the_context(tiny_checkpoint):
    code = ("import sys, minimal_run_inference as m\nm.MAX_NEW_TOKENS = 200_000\n"
            "try:\n    m.main()\nexcept m.LlamaError as error:\n    sys.exit(f'error: {error}')")
    finished = run_python(["-c", code], checkpoint=tiny_checkpoint("gqa4"))
    assert finished.returncode == 1
    assert re.search(r"the prompt \(\d+ tokens\) and MAX_NEW_TOKENS = 200000 exceed the model's context of 131072 "
                     "tokens: shorten the prompt or lower MAX_NEW_TOKENS", finished.stderr)


def test_minimal_script_names_a_missing_folder_and_the_settings_that_choose_it(tmp_path):
    finished = run_python(["minimal_run_inference.py"], checkpoint=tmp_path / "no-such-folder")
    assert finished.returncode == 1
    assert finished.stderr.startswith(f"error: no checkpoint folder at {tmp_path / 'no-such-folder'}: correct the "
                                      "LLAMA_CHECKPOINT_DIR environment variable")
    code = ("import minimal_run_inference as m\nm.LLAMA_MODELS_DIR = " + repr(str(tmp_path)) + "\nm.MODEL_NAME = 'nope'\n"
            "try:\n    m.main()\nexcept m.LlamaError as error:\n    print(error)")
    finished = run_python(["-c", code])
    assert finished.stdout.strip().endswith(": set MODEL_NAME and LLAMA_MODELS_DIR at the top of minimal_run_inference.py, "
                                            "or the LLAMA_CHECKPOINT_DIR environment variable, or download a model "
                                            "(README, Download a model)")
    tilde = run_python(["minimal_run_inference.py"], checkpoint="~/no-such-folder")  # as a quoted ~ arrives
    assert f"no checkpoint folder at {Path.home() / 'no-such-folder'}:" in tilde.stderr


def test_run_inference_names_what_chose_a_missing_folder(tmp_path):
    finished = run_python(["run_inference.py"], checkpoint=tmp_path / "no-such-folder")
    assert finished.returncode == 1
    assert finished.stderr.startswith(f"error: no checkpoint folder at {tmp_path / 'no-such-folder'}: correct the "
                                      "LLAMA_CHECKPOINT_DIR environment variable") and "MODEL_NAME and" in finished.stderr
    finished = run_python(["-c", "import run_inference as r\nr.LLAMA_MODELS_DIR = " + repr(str(tmp_path)) +
                           "\nr.MODEL_NAME = 'nope'\nr.main()"])
    assert finished.stderr.startswith(f"error: no checkpoint folder at {tmp_path / 'nope'}: set MODEL_NAME and "
                                      "LLAMA_MODELS_DIR at the top of run_inference.py"), finished.stderr
    assert finished.stderr.endswith(", or download a model (README, Download a model)\n")


def test_a_near_miss_of_a_folder_name_is_pointed_out(tmp_path):
    (tmp_path / "Llama3.2-1B-Instruct").mkdir()
    with pytest.raises(run_inference.LlamaError, match=r"1b-instruct \(did you mean Llama3.2-1B-Instruct\?\): set"):
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("LLAMA_CHECKPOINT_DIR", raising=False)
            run_inference.checkpoint_folder(str(tmp_path), "llama3.2-1b-instruct", "run_inference.py")


@pytest.mark.parametrize("script", ["run_inference.py", "minimal_run_inference.py"])
def test_a_folder_of_checkpoint_folders_is_named_as_such(tiny_checkpoint, tmp_path, script):
    """~/.llama/checkpoints itself, say: not an incomplete download."""
    shutil.copytree(tiny_checkpoint("gqa4"), tmp_path / "Tiny-Instruct")
    finished = run_python([script], checkpoint=tmp_path)
    assert finished.returncode == 1
    assert finished.stderr == f"error: {tmp_path} holds checkpoint folders (Tiny-Instruct), not one checkpoint: give the path of one of them\n"


def test_minimal_script_refuses_torchrun_and_several_shards(tiny_checkpoint, tmp_path):
    from llama_models import reshard

    code = ("import os, sys, minimal_run_inference as m\nos.environ['WORLD_SIZE'] = '2'\n"
            "try:\n    m.main()\nexcept m.LlamaError as error:\n    sys.exit(f'error: {error}')")
    under_torchrun = run_python(["-c", code], checkpoint=tiny_checkpoint("gqa4"))
    assert reshard.main([str(tiny_checkpoint("gqa4")), str(tmp_path / "mp2"), "2"]) == 0
    two_shards = run_python(["minimal_run_inference.py"], checkpoint=tmp_path / "mp2")
    for finished, shards in ((under_torchrun, 1), (two_shards, 2)):
        assert finished.returncode == 1 and "runs one process on one shard (" in finished.stderr
        assert f"has {shards}): use run_inference.py, which merges shards or splits them" in finished.stderr


def test_a_torchrun_variable_that_is_not_a_number_gets_one_line(tiny_checkpoint):
    finished = run_python(["run_inference.py"], checkpoint=tiny_checkpoint("gqa4"), variables={"RANK": "x"})
    assert finished.returncode == 1
    assert finished.stderr == ("error: the environment variable RANK='x' is not a process number: torchrun sets it; "
                               "unset it to run one process (or start the script with torchrun)\n")


def test_a_group_the_caller_started_stays_open_after_a_run(tiny_checkpoint):
    """run_inference.main() from a program that started torch.distributed itself: it joins that group,
    and closes only what it opened (fairscale's state), not the caller's group."""
    code = ("import torch.distributed as dist\n"
            "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
            "import run_inference as r\nr.MAX_NEW_TOKENS = 2\nr.main()\nprint('still open:', dist.is_initialized())")
    finished = run_python(["-c", code], checkpoint=tiny_checkpoint("gqa4"))
    assert_ran_cleanly(finished)
    assert finished.stdout.splitlines()[-1] == "still open: True"


def test_minimal_script_says_it_takes_no_arguments():
    finished = run_python(["minimal_run_inference.py", "--help"])
    assert finished.returncode == 1 and "takes no arguments (got --help)" in finished.stderr


def damage_checkpoint(folder: Path, damage: str) -> None:
    """One kind of bad download, as a new user may have it."""
    weights, tokenizer, params = folder / "consolidated.00.pth", folder / "tokenizer.model", folder / "params.json"
    if damage == "no tokenizer":
        tokenizer.unlink()
    elif damage == "no weights":
        weights.unlink()
    elif damage == "empty weights":
        weights.write_bytes(b"")
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "weights that carry code":
        torch.save({"payload": types.SimpleNamespace()}, weights)
    elif damage == "params of the wrong kind":
        params.write_text(params.read_text().replace('"use_scaled_rope": false', '"use_scaled_rope": "false"'))
    elif damage == "shapes that disagree":
        params.write_text(params.read_text().replace('"dim": 64', '"dim": 128'))
    elif damage == "damaged tokenizer":
        tokenizer.write_text("this is not base64 at all\n")
    elif damage == "tokenizer of another model":
        write_byte_level_tokenizer(tokenizer, merges=[b"ab"])
    elif damage == "a matrix of whole numbers":
        tensors = torch.load(weights, weights_only=True)
        tensors["layers.0.attention.wq.weight"] = tensors["layers.0.attention.wq.weight"].to(torch.int32)
        torch.save(tensors, weights)
    elif damage == "a weight that is not a number":
        tensors = torch.load(weights, weights_only=True)
        tensors["layers.0.attention.wq.weight"][3, 5] = float("nan")
        torch.save(tensors, weights)


DAMAGES = ["no tokenizer", "no weights", "empty weights", "truncated weights", "weights that carry code",
           "params of the wrong kind", "shapes that disagree", "damaged tokenizer", "tokenizer of another model",
           "a matrix of whole numbers", "a weight that is not a number"]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("script", ["minimal_run_inference.py", "run_inference.py"])
def test_a_bad_download_ends_in_one_line_in_both_scripts(tiny_checkpoint, tmp_path, script, damage):
    folder = shutil.copytree(tiny_checkpoint("gqa1"), tmp_path / "Llama-tiny")
    damage_checkpoint(folder, damage)
    before = folder_snapshot(folder)
    finished = run_python([script], checkpoint=folder)
    assert finished.returncode == 1
    assert "Traceback" not in finished.stderr + finished.stdout
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), finished.stderr
    if damage == "params of the wrong kind":
        assert "use_scaled_rope is 'false' in params.json" in lines[0]
    if damage == "a matrix of whole numbers":
        assert "'layers.0.attention.wq.weight'" in lines[0] and "torch.int32 numbers" in lines[0]
    if damage == "a weight that is not a number":
        assert "NaN or infinite" in lines[0]
    assert folder_snapshot(folder) == before


@pytest.mark.parametrize("script", ["minimal_run_inference.py", "run_inference.py"])
def test_both_scripts_run_a_checkpoint_saved_in_float32(tiny_checkpoint, tmp_path, script):
    """Meta ships bfloat16; a file someone saved in float32 is converted as it loads."""
    folder = shutil.copytree(tiny_checkpoint("gqa1"), tmp_path / "Llama-tiny")
    weights = folder / "consolidated.00.pth"
    torch.save({name: tensor.float() for name, tensor in torch.load(weights, weights_only=True).items()}, weights)
    finished = run_python([script], checkpoint=folder)
    assert_ran_cleanly(finished)
    assert re.search(r"^decode: [\d.]+ tokens/s$|prefill included$", finished.stdout, re.MULTILINE)  # the report


@pytest.mark.parametrize("script", ["minimal_run_inference.py", "run_inference.py"])
def test_both_scripts_read_the_hugging_face_layout_and_its_model_name(tiny_checkpoint, tmp_path, script):
    """Meta's files in <name>/original/: found there, and "Instruct" read from <name>."""
    model_folder = tmp_path / "Llama-3.2-1B-Instruct"
    shutil.copytree(tiny_checkpoint("gqa4"), model_folder / "original")
    instruct_prompt_length = len(run_inference.ChatFormat(Tokenizer(model_folder / "original" / "tokenizer.model"))
                                 .encode_dialog_prompt([{"role": "user", "content": run_inference.INPUT_STRING}]))
    finished = run_python([script], checkpoint=model_folder)
    assert_ran_cleanly(finished)
    if script == "run_inference.py":
        assert finished.stdout.startswith("Llama-3.2-1B-Instruct: ")
        assert f"prompt: {instruct_prompt_length} tokens" in finished.stdout


@pytest.mark.parametrize("script", ["minimal_run_inference.py", "run_inference.py"])
def test_meta_package_in_place_of_ours_is_named_in_one_line(tmp_path, script):
    """Meta's llama-models installs a llama_models package too (its downloader): ours cannot import."""
    meta_package = tmp_path / "site" / "llama_models"
    (meta_package / "llama3").mkdir(parents=True)
    (meta_package / "__init__.py").write_text("")
    (meta_package / "llama3" / "__init__.py").write_text("")  # Meta's has one, without our names
    environment = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    finished = subprocess.run([sys.executable, script], cwd=REPO_ROOT, env=environment, capture_output=True,
                              text=True, timeout=SUBPROCESS_TIMEOUT)
    assert finished.returncode == 1
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot import this project's llama_models" in lines[0], finished.stderr
    assert "Meta's llama-models package" in lines[0] and "pip install -r requirements.txt" in lines[0]


def test_importing_the_scripts_runs_nothing():
    code = (
        "import torch.distributed as dist\n"
        "import run_inference, minimal_run_inference\n"
        "assert not dist.is_initialized(), 'importing started torch.distributed'\n"
    )
    finished = run_python(["-c", code])
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == ""
    assert finished.stderr == ""


# ------------------------------------------------------------------------------------------------
# A prompt that fits the context but leaves less than MAX_NEW_TOKENS room
# ------------------------------------------------------------------------------------------------


def test_prompt_near_the_context_does_not_fail_midway(tiny_checkpoint, monkeypatch, capsys):
    """A prompt just shorter than the context is answered with as many tokens as the context still
    holds, without failing in the middle of generating. A 40-token context stands in for 131072."""
    context, prompt_length = 40, 37  # 'a' * 36 is 36 byte tokens, plus <|begin_of_text|>
    monkeypatch.setattr(ModelArgs, "trained_context", property(lambda args: context))
    monkeypatch.setenv("LLAMA_CHECKPOINT_DIR", str(tiny_checkpoint("gqa1")))
    monkeypatch.setattr(run_inference, "INPUT_STRING", "a" * (prompt_length - 1))
    monkeypatch.setattr(run_inference, "MAX_NEW_TOKENS", 8)
    monkeypatch.setattr(run_inference, "DTYPE", "float32")
    monkeypatch.setattr(run_inference, "DEVICE", "cpu")
    monkeypatch.setattr(run_inference, "DECODING", "greedy")
    # run() ends by closing the process group; other tests in this process still need it.
    monkeypatch.setattr(run_inference, "end_model_parallel", lambda: None)
    run_inference.run()
    output = capsys.readouterr().out
    assert "(the prompt is 37 tokens, so 3 of MAX_NEW_TOKENS = 8 fit in the model's context of 40)" in output
    reported = re.search(r"^prompt: (\d+) tokens, generated: (\d+) tokens$", output, re.MULTILINE)
    assert reported is not None
    assert int(reported.group(1)) == prompt_length
    # The cache holds positions 0..39: the prompt takes 37, so 3 tokens fit (fewer if a stop token comes).
    assert 1 <= int(reported.group(2)) <= context - prompt_length


def test_prompt_prefilled_in_chunks_decodes_like_one_prefill(float32_model, monkeypatch):
    """A prompt longer than PREFILL_CHUNK goes through the model in pieces; greedy tokens and their
    probabilities equal those of a single prefill call."""
    model, _, _ = float32_model("gqa3")
    prompt = [256, *range(40, 51)]  # 12 tokens
    whole = list(run_inference.greedy_decode(model, prompt, max_new_tokens=6))
    monkeypatch.setattr(run_inference, "PREFILL_CHUNK", 5)  # 3 calls: 5 + 5 + 2 tokens
    calls, original_hidden_states = [], model.hidden_states

    def counting_hidden_states(tokens, start_pos):
        calls.append(tokens.shape[1])
        return original_hidden_states(tokens, start_pos)

    monkeypatch.setattr(model, "hidden_states", counting_hidden_states)
    chunked = list(run_inference.greedy_decode(model, prompt, max_new_tokens=6))
    assert calls[:3] == [5, 5, 2]
    assert [token for token, _ in chunked] == [token for token, _ in whole]
    assert [p for _, p in chunked] == pytest.approx([p for _, p in whole], rel=1e-4)
