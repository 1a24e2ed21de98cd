"""Loading checkpoints: what gets fixed quietly, and a one-line error for everything that cannot be."""

import json
import mmap
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoints import TINY_SHAPES, folder_snapshot, mapped_file_rss_bytes, memory_mapped_ranges, write_checkpoint
from llama_models import reshard
from llama_models.llama3 import LlamaError, ModelArgs, load_llama
from llama_models.llama3.checkpoint import checkpoint_folder, find_checkpoint_files
from llama_models.llama3.parallel import check_process_numbers, check_rendezvous_variables
from llama_models.llama3.sharding import release_mapped_pages
from tokenizer_files import write_byte_level_tokenizer


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    """A private copy of a tiny checkpoint that a test may damage."""
    return shutil.copytree(tiny_checkpoint("gqa3"), tmp_path / "Llama-tiny")


def load_error(folder, **kwargs) -> str:
    """Load `folder`, expect a LlamaError, check it is one line and nothing changed on disk."""
    before = folder_snapshot(folder) if folder.is_dir() else None
    with pytest.raises(LlamaError) as error:
        load_llama(folder, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    if before is not None:
        assert folder_snapshot(folder) == before
    return message


# --- quiet fixes --------------------------------------------------------------------------------


def test_missing_output_weight_reuses_the_embedding(tiny_checkpoint):
    model, _ = load_llama(tiny_checkpoint("gqa4"))  # written without output.weight, like tied 3.2 files
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_stray_rope_freqs_tensor_is_dropped(checkpoint_copy):
    path = checkpoint_copy / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    state_dict["rope.freqs"] = torch.ones(8)
    torch.save(state_dict, path)
    model, _ = load_llama(checkpoint_copy, dtype=torch.float32)
    assert "rope.freqs" not in model.state_dict()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_weights_are_used_in_place_without_a_copy(tiny_checkpoint):
    """bfloat16 on the CPU: the parameters live inside the memory-mapped file, not in copies."""
    model, _ = load_llama(tiny_checkpoint("gqa1"), dtype=torch.bfloat16)
    mapped = memory_mapped_ranges("consolidated.00.pth")
    for name, weight in model.named_parameters():
        assert any(weight.data_ptr() in addresses for addresses in mapped), name


def test_kv_cache_is_sized_and_typed_as_asked(tiny_checkpoint):
    model, _ = load_llama(tiny_checkpoint("gqa4"), dtype=torch.float32, max_seq_len=48, max_batch_size=3)
    shape = TINY_SHAPES["gqa4"]
    cache = model.layers[0].attention.cache_k
    # (batch, kv heads, positions, head_dim)
    assert cache.shape == (3, shape["n_kv_heads"], 48, shape["dim"] // shape["n_heads"])
    assert cache.dtype == torch.float32


# --- bad folders and files ----------------------------------------------------------------------


@pytest.mark.parametrize("given", [None, 123, "params.json"])
def test_a_folder_that_is_no_path_or_a_file_is_named(checkpoint_copy, given):
    path = checkpoint_copy / given if given == "params.json" else given
    with pytest.raises(LlamaError) as error:
        load_llama(path)
    expected = "is a file: give the checkpoint folder" if given == "params.json" else "give its path, a str or a Path"
    assert expected in str(error.value)


def test_missing_folder(tmp_path):
    message = load_error(tmp_path / "Llama3.2-1B-Instruct")
    assert "Llama3.2-1B-Instruct" in message and "not found" in message


@pytest.mark.parametrize("name", ["params.json", "tokenizer.model", "consolidated.00.pth"])
def test_missing_file(checkpoint_copy, name):
    (checkpoint_copy / name).unlink()
    message = load_error(checkpoint_copy)
    assert ("params.json" if name == "params.json" else name.split(".")[0]) in message
    assert "download" in message


def test_a_transformers_only_download_is_named(tmp_path):
    """A Hugging Face download without --include 'original/*': transformers' files only."""
    folder = tmp_path / "Llama-3.2-1B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    message = load_error(folder)
    assert "transformers' copy of the weights, not Meta's files" in message and "original/*" in message


@pytest.mark.parametrize("text", ['{"dim": 96,', '{"dim": 1' + "0" * 5000 + "}", '{"x": ' + "[" * 100000 + "]" * 100000 + "}"],
                         ids=["cut short", "a 5001-digit number", "nested 100000 deep"])
def test_invalid_json(checkpoint_copy, text):
    (checkpoint_copy / "params.json").write_text(text)
    assert "params.json is not valid JSON" in load_error(checkpoint_copy)


def test_params_that_do_not_match_the_weights(checkpoint_copy):
    params = json.loads((checkpoint_copy / "params.json").read_text())
    params["n_kv_heads"] = params["n_heads"]  # wk/wv in the file are narrower than this implies
    (checkpoint_copy / "params.json").write_text(json.dumps(params))
    message = load_error(checkpoint_copy)
    assert "layers.0.attention.wk.weight" in message and "different models" in message


def test_more_layers_in_params_than_in_the_file(checkpoint_copy):
    params = json.loads((checkpoint_copy / "params.json").read_text())
    params["n_layers"] += 1
    (checkpoint_copy / "params.json").write_text(json.dumps(params))
    message = load_error(checkpoint_copy)
    assert f"layers.{params['n_layers'] - 1}." in message


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_a_damaged_weights_file_is_named_without_pytorchs_advice(checkpoint_copy, damage):
    """PyTorch's own text for a damaged zip asks to re-save the file, or calls itself an internal error."""
    path = checkpoint_copy / "consolidated.00.pth"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2] if damage == "truncated" else os.urandom(size))
    message = load_error(checkpoint_copy)
    assert message == (f"{path} could not be read as PyTorch weights: the file is truncated or not a checkpoint; "
                       "download it again")


class RunsCode:
    """Unpickling this calls os.getcwd: harmless, but a call all the same."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_a_tensor_without_plain_numbers_is_refused(checkpoint_copy, kind):
    path = checkpoint_copy / "consolidated.00.pth"
    tensors = torch.load(path, weights_only=True)
    norm = tensors["norm.weight"]
    tensors["norm.weight"] = torch.empty(norm.shape, device="meta") if kind == "meta" else norm.float().to_sparse()
    torch.save(tensors, path)
    assert "tensor 'norm.weight' in" in load_error(checkpoint_copy) and "not written for Llama" in load_error(checkpoint_copy)


def test_weights_file_that_carries_code_is_refused_without_running_it(checkpoint_copy):
    torch.save({"tok_embeddings.weight": torch.zeros(2), "payload": RunsCode()}, checkpoint_copy / "consolidated.00.pth")
    message = load_error(checkpoint_copy)
    assert "holds Python objects that are not tensors (" in message and "getcwd)" in message
    assert "never runs code" in message and "download the checkpoint again" in message
    assert "weights_only" not in message and "truncated" not in message  # no advice to turn the check off


def test_hugging_face_layout_loads_from_its_original_folder(checkpoint_copy, tmp_path):
    """huggingface-cli download ... --include "original/*" puts Meta's files in original/."""
    model_folder = tmp_path / "Llama-3.2-1B-Instruct"
    shutil.copytree(checkpoint_copy, model_folder / "original")
    files = find_checkpoint_files(model_folder)
    assert files.folder == model_folder / "original" and files.model_name == "Llama-3.2-1B-Instruct"
    model, _ = load_llama(model_folder, max_seq_len=8)
    assert model.args.dim == TINY_SHAPES["gqa3"]["dim"]


def test_file_that_is_not_a_pytorch_checkpoint(checkpoint_copy):
    (checkpoint_copy / "consolidated.00.pth").write_text("<html>Access denied</html>")
    assert "consolidated.00.pth could not be read" in load_error(checkpoint_copy)


def test_tokenizer_from_another_model(checkpoint_copy):
    write_byte_level_tokenizer(checkpoint_copy / "tokenizer.model", merges=[b"ab"])
    message = load_error(checkpoint_copy)
    assert "vocab_size=512" in message and "513 tokens" in message


def test_damaged_tokenizer_file(checkpoint_copy):
    (checkpoint_copy / "tokenizer.model").write_text("not base64 at all\n")
    assert "tokenizer.model" in load_error(checkpoint_copy)


def test_stray_extra_shard_is_caught_by_the_shape_check(checkpoint_copy):
    """One process merges all .pth files in the folder, so a stray copy doubles every matrix."""
    shutil.copyfile(checkpoint_copy / "consolidated.00.pth", checkpoint_copy / "consolidated.01.pth")
    message = load_error(checkpoint_copy)
    assert "tok_embeddings.weight" in message and checkpoint_copy.name in message and "different models" in message


def test_a_pth_file_not_named_as_a_shard_is_named(checkpoint_copy):
    shutil.copyfile(checkpoint_copy / "consolidated.00.pth", checkpoint_copy / "consolidated.00 (copy).pth")
    assert "consolidated.00 (copy).pth is not a shard's name" in load_error(checkpoint_copy)


def test_a_gap_in_the_shard_numbers_names_the_missing_shard(checkpoint_copy):
    shutil.copyfile(checkpoint_copy / "consolidated.00.pth", checkpoint_copy / "consolidated.02.pth")
    assert "has 2 shards but no consolidated.01.pth" in load_error(checkpoint_copy)


def test_shards_are_read_in_the_order_of_their_numbers(tmp_path):
    """405B may be cut into 128 shards: by name, consolidated.100.pth would come before .11."""
    for name in ("params.json", "tokenizer.model", *(f"consolidated.{index:02d}.pth" for index in range(101))):
        (tmp_path / name).touch()
    shards = find_checkpoint_files(tmp_path).shards
    assert [shard.name for shard in shards] == [f"consolidated.{index:02d}.pth" for index in range(101)]


def test_a_missing_last_shard_is_suggested_by_the_sizes(tiny_checkpoint, tmp_path, capsys):
    """Without its last shard a folder looks like a whole checkpoint of half-size matrices."""
    reshard.main([str(tiny_checkpoint("gqa3")), str(tmp_path / "two"), "2"])
    (tmp_path / "two" / "consolidated.01.pth").unlink()
    assert "(1/2 of it: if the checkpoint has 2 shards, some are missing" in load_error(tmp_path / "two")


@pytest.mark.parametrize("damage", ["dangling link", "folder"])
def test_a_shard_that_is_no_file_is_named(checkpoint_copy, damage):
    """A Hugging Face cache links each file to a blob, which may be missing."""
    shard = checkpoint_copy / "consolidated.00.pth"
    shard.unlink()
    shard.symlink_to(checkpoint_copy / "blob-that-never-came") if damage == "dangling link" else shard.mkdir()
    expected = "which does not exist" if damage == "dangling link" else "is a folder where the file of weights"
    message = load_error(checkpoint_copy)
    assert message.startswith(f"{shard} ") and expected in message


@pytest.mark.parametrize("extra", [{"quantization_args": {"group_size": 256}}, {"vision_chunk_size": 560}])
def test_quantized_and_vision_checkpoints_are_refused(checkpoint_copy, extra):
    params = json.loads((checkpoint_copy / "params.json").read_text())
    (checkpoint_copy / "params.json").write_text(json.dumps(params | extra))
    assert "not run" in load_error(checkpoint_copy)


# --- devices ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x"])
def test_unknown_device(tiny_checkpoint, name):
    assert "device" in load_error(tiny_checkpoint("gqa1"), device=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_cuda(tiny_checkpoint):
    assert "not available" in load_error(tiny_checkpoint("gqa1"), device="cuda")


# --- ModelArgs ----------------------------------------------------------------------------------

# (dim, multiple_of, ffn_dim_multiplier) of Meta's models and their FFN width, from the facts file.
REAL_FFN_WIDTHS = [
    ((4096, 1024, 1.3), 14336),  # 3.1 8B
    ((2048, 256, 1.5), 8192),  # 3.2 1B
    ((3072, 256, 1.0), 8192),  # 3.2 3B
    ((8192, 4096, 1.3), 28672),  # 70B
    ((16384, 4096, 1.2), 53248),  # 405B
]


@pytest.mark.parametrize("shape, width", REAL_FFN_WIDTHS)
def test_feed_forward_width_of_real_models(shape, width):
    dim, multiple_of, multiplier = shape
    args = ModelArgs(dim=dim, n_heads=dim // 128, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
    assert args.ffn_hidden_dim == width


def test_rope_scale_factor_is_32_for_llama_3_2_small_models_and_8_otherwise():
    assert ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8).rope_scale_factor == 32
    assert ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8).rope_scale_factor == 32
    assert ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8).rope_scale_factor == 8
    assert ModelArgs(dim=2048, n_layers=16, n_heads=32, rope_scale_factor=8).rope_scale_factor == 8


def test_unknown_params_fields_are_ignored():
    args = ModelArgs.from_params({"dim": 64, "n_heads": 4, "n_layers": 2, "some_future_field": 1}, max_seq_len=32)
    assert (args.dim, args.head_dim, args.n_kv_heads, args.max_seq_len) == (64, 16, 4, 32)


@pytest.mark.parametrize("params", [{"dim": 64, "n_heads": 5}, {"dim": 64, "n_heads": 4, "n_kv_heads": 3}])
def test_inconsistent_head_counts(params):
    with pytest.raises(LlamaError, match="not divisible"):
        ModelArgs.from_params(params | {"n_layers": 2})


GOOD_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32,
               "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}


@pytest.mark.parametrize("field, value", [
    ("dim", "128"), ("dim", 128.0), ("dim", True), ("n_heads", 0), ("n_layers", -1), ("n_kv_heads", "2"),
    ("vocab_size", [512]), ("norm_eps", "1e-5"), ("rope_theta", 0), ("ffn_dim_multiplier", "1.5"),
    ("use_scaled_rope", "false"), ("use_scaled_rope", 1), ("ffn_dim_multiplier", float("inf")),
    ("norm_eps", float("inf")), ("rope_theta", float("nan")), ("rope_theta", 1e-50), ("n_layers", 200000),
    ("ffn_dim_multiplier", 1e300), ("dim", 2**30),
])
def test_params_of_the_wrong_kind_are_refused_by_name(field, value):
    """A hand-edited params.json: one line naming the field and its value, never a traceback or a
    silent misreading ("false" in quotes is a true value in Python)."""
    with pytest.raises(LlamaError, match=f"^{field} is {re.escape(repr(value))} in params.json"):
        ModelArgs.from_params(GOOD_PARAMS | {field: value})


def test_params_whose_model_is_not_an_object_are_refused():
    """A few files nest the arguments under "model"; there they must be an object too."""
    with pytest.raises(LlamaError, match=r'^"model" is 5 in params.json'):
        ModelArgs.from_params({"model": 5})


@pytest.mark.parametrize("runtime", [{"max_seq_len": 0}, {"max_batch_size": "2"}, {"rope_scale_factor": -8},
                                     {"rope_scale_factor": 1e-300}])
def test_a_bad_runtime_value_is_blamed_on_the_caller_not_on_params_json(runtime):
    with pytest.raises(LlamaError, match=f"^{next(iter(runtime))}=") as error:
        ModelArgs.from_params(GOOD_PARAMS, **runtime)
    assert "params.json" not in str(error.value)


def test_a_kv_cache_too_large_for_memory_is_named(tiny_checkpoint):
    """366 TiB, refused before any of it is allocated: more than any machine's memory."""
    message = load_error(tiny_checkpoint("gqa4"), max_seq_len=2**20, max_batch_size=10**6)
    assert message.startswith("the cpu memory cannot hold the KV cache of 1000000 sequence(s) of 1048576 positions")


def test_runtime_values_in_params_json_are_ignored():
    """Whoever runs the model sizes its cache, also where a params.json from elsewhere names a size."""
    written = GOOD_PARAMS | {"max_seq_len": 4096, "max_batch_size": 32, "rope_scale_factor": 2.0}
    args = ModelArgs.from_params(written, max_seq_len=64)
    assert (args.max_seq_len, args.max_batch_size, args.rope_scale_factor) == (64, 1, 8.0)


@pytest.mark.parametrize("field", ["dim", "n_layers", "n_heads"])
def test_params_without_a_size_are_refused(field):
    """Not filled in with 8B's sizes, which would blame the weights for not matching."""
    params = {name: value for name, value in GOOD_PARAMS.items() if name != field}
    with pytest.raises(LlamaError, match=f"params.json has no {field}"):
        ModelArgs.from_params(params)


def test_good_params_are_read_as_written():
    args = ModelArgs.from_params(GOOD_PARAMS)
    assert (args.dim, args.n_layers, args.use_scaled_rope, args.ffn_dim_multiplier) == (64, 2, True, 1.5)


# --- memory ---------------------------------------------------------------------------------------

MEDIUM_SHAPE = dict(dim=1024, n_layers=12, n_heads=16, n_kv_heads=4, multiple_of=256, ffn_dim_multiplier=None,
                    use_scaled_rope=True, with_output=True)  # ~270 MB in bfloat16

MEASURE_LOAD_MEMORY = """
import sys, torch
from llama_models.llama3 import load_llama

def status_bytes(field):  # VmRSS: resident now; VmHWM: the peak of this program (ru_maxrss would
    with open("/proc/self/status") as status:  # include the parent's peak, inherited across fork)
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

# Warm up on a tiny checkpoint first: torch.distributed, gloo and the matmul libraries take ~25 MB the
# first time they run, whatever the model's size.
tiny, _ = load_llama(sys.argv[2], max_seq_len=64, dtype=sys.argv[3])
tiny(torch.tensor([[1]]), start_pos=0)
before = status_bytes("VmRSS")
model, _ = load_llama(sys.argv[1], max_seq_len=64, dtype=sys.argv[3])
# Reads every weight page once. One token: a product of several rows may try a whole float32 copy of
# a matrix (products.py), memory of the kernels' own, not of loading.
model(torch.tensor([[1]]), start_pos=0)
print(status_bytes("VmHWM") - before)
"""


@pytest.fixture(scope="module")
def medium_checkpoint(tmp_path_factory):
    """{shard count: folder}: a ~270 MB bfloat16 checkpoint, as one shard and resharded to two."""
    folder = write_checkpoint(tmp_path_factory.mktemp("medium") / "one-shard", MEDIUM_SHAPE)
    two_shards = folder.parent / "two-shards"
    reshard.reshard(folder, two_shards, 2)
    return {1: folder, 2: two_shards}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc/self/status")
@pytest.mark.parametrize("dtype, n_shards", [("bfloat16", 1), ("float32", 1), ("bfloat16", 2), ("float32", 2)])
def test_loading_keeps_one_copy_of_the_weights(medium_checkpoint, tiny_checkpoint, dtype, n_shards):
    """Peak memory added by loading and one forward pass stays within 10% of the weights: no second copy.

    One bfloat16 shard is used in place. Converting (to float32) or gluing two shards together copies,
    and each tensor's mapped pages are given back once copied: without that, the peak was 1.5x the
    float32 weights, and 2x for two shards in bfloat16.
    """
    folder = medium_checkpoint[n_shards]
    file_bytes = sum(shard.stat().st_size for shard in folder.glob("*.pth"))  # bfloat16
    weight_bytes = file_bytes * (2 if dtype == "float32" else 1)
    finished = subprocess.run(
        [sys.executable, "-c", MEASURE_LOAD_MEMORY, str(folder), str(tiny_checkpoint("gqa1")), dtype],
        capture_output=True, text=True, timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    added = int(finished.stdout.split()[-1])
    assert 0.5 * weight_bytes < added < 1.1 * weight_bytes  # the weights are resident once, not twice


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="pages are given back on Linux only")
def test_released_pages_leave_memory_and_keep_their_numbers(tmp_path):
    """The pages of a mapped tensor leave the process, and reading the tensor brings them back."""
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.randn(1024, 1024).bfloat16()}, path)  # 2 MiB
    mapped = torch.load(path, mmap=True, weights_only=True)["w"]
    numbers = mapped.clone()  # reading it brings every page into memory
    resident_before = mapped_file_rss_bytes(path)
    release_mapped_pages(mapped, [path])
    assert resident_before >= mapped.nbytes
    assert mapped_file_rss_bytes(path) <= 2 * mmap.PAGESIZE  # the pages shared with the file's header and end
    assert torch.equal(mapped, numbers)  # read again from the file


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="pages are given back on Linux only")
def test_release_leaves_memory_outside_the_files_alone(tmp_path):
    """madvise(MADV_DONTNEED) would zero ordinary memory: only the shards' mappings are given back."""
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(4)}, path)
    file_tensor = torch.load(path, mmap=True, weights_only=True)["w"]  # keeps the file mapped
    ordinary = torch.randn(1024, 1024)
    numbers = ordinary.clone()
    release_mapped_pages(ordinary, [path])
    assert torch.equal(ordinary, numbers)
    assert torch.equal(file_tensor, torch.ones(4))


def test_output_weight_stored_as_the_embedding_stays_one_tensor(checkpoint_copy):
    """Meta's 3.2 1B/3B files hold output.weight as the embedding's own storage: converting it
    (here to float32) must still give one matrix, not two."""
    path = checkpoint_copy / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    state_dict["output.weight"] = state_dict["tok_embeddings.weight"]  # torch.save keeps the sharing
    torch.save(state_dict, path)
    model, _ = load_llama(checkpoint_copy, dtype=torch.float32)
    assert model.output.weight.dtype == torch.float32
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_model_is_built_without_memory_for_its_weights(monkeypatch):
    """Weights start as meta-device placeholders, also as process 1 of 2 under a GPU-like default
    device (the meta device stands in for CUDA here): nothing is allocated before loading."""
    from llama_models.llama3 import model as model_module

    monkeypatch.setattr(model_module, "get_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(model_module, "get_model_parallel_rank", lambda: 1)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=16)
    with torch.device("meta"):
        model = model_module.Transformer(args)
    weights = {name: weight for name, weight in model.named_parameters() if not name.endswith("norm.weight")}
    assert all(weight.is_meta for weight in weights.values())
    assert weights["layers.0.attention.wq.weight"].shape == (32, 64)  # half of the 64 query rows
    assert weights["layers.0.attention.wo.weight"].shape == (64, 32)  # half of the 64 input columns
    assert model.tok_embeddings.vocab_start_index == 256  # process 1 owns the second half of the vocabulary


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("variables, check, culprit", [
    ({"WORLD_SIZE": "two"}, check_process_numbers, "WORLD_SIZE='two' is not a process number"),
    ({"LOCAL_RANK": "-1"}, check_process_numbers, "LOCAL_RANK='-1' is not a process number"),
    ({"RANK": "0", "WORLD_SIZE": "1"}, check_rendezvous_variables,
     "RANK is set but not MASTER_ADDR and MASTER_PORT: torchrun sets them all"),
])
def test_a_torchrun_environment_that_torch_distributed_cannot_start_from_is_named(variables, check, culprit,
                                                                                  monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    check_process_numbers()  # outside torchrun: nothing to check
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LlamaError, match=re.escape(culprit)):
        check()


def test_a_group_the_caller_started_is_joined_whatever_rank_says(tiny_checkpoint, monkeypatch):
    """torch.distributed started by the caller (here: ours, a group of one) needs no MASTER_ADDR."""
    load_llama(tiny_checkpoint("gqa1"), max_seq_len=8)  # starts the group, unless a test before did
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    model, _ = load_llama(tiny_checkpoint("gqa1"), max_seq_len=8)
    assert model(torch.tensor([[1, 2]]), start_pos=0).isfinite().all()


@pytest.mark.parametrize("models_dir, model_name, culprit", [(None, "Llama3.2-1B", "LLAMA_MODELS_DIR = None"),
                                                            ("~/.llama/checkpoints", 5, "MODEL_NAME = 5")])
def test_a_folder_setting_that_is_not_text_is_named(models_dir, model_name, culprit):
    with pytest.raises(LlamaError, match=f"^{culprit}: write a folder name in quotes"):
        checkpoint_folder(models_dir, model_name, "minimal_run_inference.py")


@pytest.mark.parametrize("beside, shown", [("Llama3.2-1B-Instruct ", "'Llama3.2-1B-Instruct '"),
                                           ("Llama3.2-1B-Instruct\x1b[2J", "'Llama3.2-1B-Instruct\\x1b[2J'")])
def test_a_near_miss_that_would_look_like_the_name_given_is_quoted(tmp_path, monkeypatch, beside, shown):
    (tmp_path / beside).mkdir()
    monkeypatch.delenv("LLAMA_CHECKPOINT_DIR", raising=False)
    with pytest.raises(LlamaError, match=re.escape(f"(did you mean {shown}?)")):
        checkpoint_folder(str(tmp_path), "Llama3.2-1B-Instruct", "run_inference.py")
