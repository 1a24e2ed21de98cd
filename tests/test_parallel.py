"""Model parallelism: each process's slices, the reshard tool, and torchrun runs checked against one process.

The tiny "gqa4" checkpoint has 8 query heads and 2 key/value heads, so 4 processes need its KV heads
repeated. It is resharded to 2 and 4 shards once per module; the torchrun tests run
tests/parallel_worker.py with gloo on the CPU, in float32, and compare with this process.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import TINY_SHAPES, folder_snapshot, memory_mapped_ranges
from llama_models import quantize as quantize_tool
from llama_models import reshard
from llama_models.llama3 import LlamaError, ModelArgs, load_llama
from llama_models.llama3.quantize import Int4Weight, Int8Weight
from llama_models.llama3.sharding import args_for_model_parallel, check_world_size, local_state_dict, valid_world_sizes
from parallel_worker import N_NEW_TOKENS, PROMPT, greedy_decode

TOLERANCE = 1e-4  # float32; sharded sums add the same products in a different order
WORKER = Path(__file__).with_name("parallel_worker.py")


@pytest.fixture(scope="module")
def sharded(tiny_checkpoint, tmp_path_factory) -> dict:
    """{shard count: folder}: gqa4 as written (1 shard), and resharded to 2 and 4 shards."""
    source = tiny_checkpoint("gqa4")
    folders = {1: source}
    for n_shards in (2, 4):
        folders[n_shards] = tmp_path_factory.mktemp("resharded") / f"gqa4-mp{n_shards}"
        assert reshard.main([str(source), str(folders[n_shards]), str(n_shards)]) == 0
    return folders


@pytest.fixture(scope="module")
def one_process_result(sharded) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and their logits from this process on the unsharded checkpoint."""
    model, _ = load_llama(sharded[1], dtype=torch.float32, max_seq_len=len(PROMPT) + N_NEW_TOKENS)
    return greedy_decode(model, PROMPT, N_NEW_TOKENS)


def shard_tensors(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def model_args(folder: Path) -> ModelArgs:
    return ModelArgs.from_json_file(folder / "params.json")


def shard_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.pth"))


# --- which process counts work ------------------------------------------------------------------


def test_process_counts_for_meta_checkpoints():
    llama_70b = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3)
    llama_405b_mp16 = ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=16, multiple_of=4096,
                                ffn_dim_multiplier=1.2)
    assert valid_world_sizes(llama_70b, n_shards=8) == [1, 2, 4, 8, 16, 32, 64]
    assert valid_world_sizes(llama_405b_mp16, n_shards=16) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert args_for_model_parallel(llama_70b, 16).n_kv_heads == 16  # each KV head on two processes
    assert args_for_model_parallel(llama_70b, 4).n_kv_heads == 8


def test_process_count_that_fits_neither_way_is_refused_in_one_line(sharded):
    with pytest.raises(LlamaError) as error:
        check_world_size(model_args(sharded[2]), n_shards=2, world_size=3, folder=sharded[2])
    message = str(error.value)
    assert "\n" not in message
    assert "cannot be split 3 ways: its 2 shard(s) cannot be cut or glued into 3" in message and "1, 2, 4, 8" in message


def test_an_int4_folder_names_its_groups_as_what_a_process_count_would_cut():
    """A group size that fits the model but not half its inputs: the groups are named, not the heads."""
    args = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=32, quantization={"scheme": "int4",
                                                                                                 "group_size": 128})
    with pytest.raises(LlamaError, match=r"cannot be split 2 ways: its int4 groups of 128 inputs would be cut "
                                         r"\(128 inputs, 64 a process\); only 1 fits$"):
        args_for_model_parallel(args, 2)


# --- one process's slices -----------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_with_one_process_per_shard_each_maps_its_own_file(sharded):
    paths = shard_paths(sharded[2])
    args = args_for_model_parallel(model_args(sharded[2]), 2)
    tensors = local_state_dict(paths, rank=1, world_size=2, args=args)
    own_file = memory_mapped_ranges(paths[1])
    for name, tensor in tensors.items():
        assert any(tensor.data_ptr() in addresses for addresses in own_file), name


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_with_more_processes_than_shards_row_slices_are_views_of_the_file(sharded):
    paths = shard_paths(sharded[1])
    args = args_for_model_parallel(model_args(sharded[1]), 2)
    tensors = local_state_dict(paths, rank=1, world_size=2, args=args)
    whole = shard_tensors(paths[0])
    mapped = memory_mapped_ranges(paths[0])
    wq = "layers.0.attention.wq.weight"  # column-parallel: rank 1 of 2 holds the second half of the rows
    assert torch.equal(tensors[wq], whole[wq][args.dim // 2 :])
    assert any(tensors[wq].data_ptr() in addresses for addresses in mapped)
    wo = "layers.0.attention.wo.weight"  # row-parallel: the second half of the columns, copied out
    assert torch.equal(tensors[wo], whole[wo][:, args.dim // 2 :]) and tensors[wo].is_contiguous()


def test_kv_heads_are_repeated_when_processes_outnumber_them(sharded):
    paths = shard_paths(sharded[1])
    args = args_for_model_parallel(model_args(sharded[1]), 4)  # 2 KV heads, 4 processes
    whole_wk = shard_tensors(paths[0])["layers.1.attention.wk.weight"]  # (2 heads * head_dim, dim)
    assert args.n_kv_heads == 4
    for rank in range(4):
        wk = local_state_dict(paths, rank, 4, args)["layers.1.attention.wk.weight"]
        kv_head = rank // 2  # processes 0 and 1 share head 0, processes 2 and 3 head 1
        assert torch.equal(wk, whole_wk[kv_head * args.head_dim : (kv_head + 1) * args.head_dim])


@pytest.mark.parametrize("n_shards", [2, 4])
def test_one_process_merges_the_shards(sharded, one_process_result, n_shards):
    model, _ = load_llama(sharded[n_shards], dtype=torch.float32, max_seq_len=len(PROMPT) + N_NEW_TOKENS)
    tokens, logits = greedy_decode(model, PROMPT, N_NEW_TOKENS)
    expected_tokens, expected_logits = one_process_result
    assert tokens == expected_tokens
    assert (logits - expected_logits).abs().max().item() < TOLERANCE


# --- the reshard tool ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape_name", ["gqa1", "gqa4"])  # gqa4 repeats its 2 KV heads on the way to 4
def test_reshard_1_4_2_1_round_trips_bit_for_bit(tiny_checkpoint, tmp_path, capsys, shape_name):
    source = tiny_checkpoint(shape_name)
    before = folder_snapshot(source)
    folder = source
    for step, n_shards in enumerate([4, 2, 1]):
        target = tmp_path / f"step{step}-mp{n_shards}"
        assert reshard.main([str(folder), str(target), str(n_shards)]) == 0
        assert len(shard_paths(target)) == n_shards
        folder = target

    original = shard_tensors(source / "consolidated.00.pth")
    round_tripped = shard_tensors(folder / "consolidated.00.pth")
    assert original.keys() == round_tripped.keys()
    for name, tensor in original.items():
        assert round_tripped[name].dtype == tensor.dtype and torch.equal(round_tripped[name], tensor), name
    for name in ("params.json", "tokenizer.model"):
        assert (folder / name).read_bytes() == (source / name).read_bytes()
    assert folder_snapshot(source) == before
    assert "consolidated.03.pth" in capsys.readouterr().out


def test_reshard_records_repeated_kv_heads_in_params(sharded):
    assert model_args(sharded[2]).n_kv_heads == TINY_SHAPES["gqa4"]["n_kv_heads"] == 2
    assert model_args(sharded[4]).n_kv_heads == 4
    wk = shard_tensors(shard_paths(sharded[4])[0])["layers.0.attention.wk.weight"]
    assert wk.shape[0] == model_args(sharded[4]).head_dim  # one KV head per shard


@pytest.mark.parametrize("problem", ["three ways", "same folder", "inside source", "not empty", "zero", "negative"])
def test_reshard_refuses_in_one_line_and_leaves_the_source_alone(sharded, tmp_path, capsys, problem):
    source = sharded[2]
    before = folder_snapshot(source)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    dst, n_shards = {
        "three ways": (tmp_path / "new", "3"),
        "same folder": (source, "1"),
        "inside source": (source / "merged", "1"),
        "not empty": (tmp_path / "busy", "1"),
        "zero": (tmp_path / "new", "0"),
        "negative": (tmp_path / "new", "-2"),
    }[problem]
    assert reshard.main([str(source), str(dst), n_shards]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert folder_snapshot(source) == before
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("damage", ["shards disagree", "tensor missing", "wrong shape"])
def test_reshard_reads_the_source_as_the_loader_does(sharded, tmp_path, capsys, damage):
    """A damaged source is refused before anything is written, where a copy of it would load no better."""
    source = shutil.copytree(sharded[2], tmp_path / "damaged")
    shard = source / "consolidated.01.pth"
    tensors = torch.load(shard, weights_only=True)
    if damage == "shards disagree":
        tensors["layers.0.attention.wo.weight"] = tensors["layers.0.attention.wo.weight"][:, :8].clone()
    elif damage == "tensor missing":
        del tensors["layers.1.feed_forward.w3.weight"]
    for path in source.glob("*.pth") if damage == "wrong shape" else ():
        both = torch.load(path, weights_only=True)
        both["norm.weight"] = both["norm.weight"][:-1].clone()
        torch.save(both, path)
    if damage != "wrong shape":
        torch.save(tensors, shard)
    expected = {"shards disagree": "'layers.0.attention.wo.weight' has shape", "tensor missing": "no tensor",
                "wrong shape": "'norm.weight'"}[damage]
    for n_shards in ("1", "4"):
        assert reshard.main([str(source), str(tmp_path / "copy"), n_shards]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1 and expected in error, error
        assert not (tmp_path / "copy").exists()


def test_reshard_refuses_to_run_under_torchrun(sharded, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert reshard.main([str(sharded[1]), str(tmp_path / "copy"), "2"]) == 2
    assert "not under torchrun" in capsys.readouterr().err and not (tmp_path / "copy").exists()


def test_the_tools_write_nothing_inside_a_hugging_face_folder(sharded, tmp_path, capsys):
    """There the checkpoint is in original/, and the folder above is the source too."""
    folder = tmp_path / "Llama-hf"
    shutil.copytree(sharded[1], folder / "original")
    assert reshard.main([str(folder), str(folder / "mp2"), "2"]) == 2
    assert quantize_tool.main([str(folder), str(folder / "int8"), "int8"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all("is the source checkpoint folder or inside it" in line for line in errors)
    assert sorted(path.name for path in folder.iterdir()) == ["original"]


# --- torchrun -----------------------------------------------------------------------------------


def run_with_torchrun(n_processes: int, folders: list[Path], out_dir: Path) -> list[list[dict]]:
    """Run parallel_worker.py on `n_processes` processes; per folder, each process's result."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n_processes),
               str(WORKER), str(out_dir), *map(str, folders)]
    # One thread per process: the processes already share the CPU cores (torchrun would warn and do it).
    # TMPDIR: torchrun writes a torchelastic_* folder of logs there, which /tmp would keep forever.
    environment = os.environ | {"OMP_NUM_THREADS": "1", "TMPDIR": str(out_dir)}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    # Only the main process prints: one line per folder.
    assert finished.stdout.count(": [") == len(folders), finished.stdout
    return [
        [torch.load(out_dir / f"{index}.rank{rank}.pt", weights_only=True) for rank in range(n_processes)]
        for index in range(len(folders))
    ]


def check_processes_agree_with_one_process(results: list[dict], one_process_result):
    expected_tokens, expected_logits = one_process_result
    for result in results:
        assert result["tokens"] == expected_tokens
        assert (result["logits"] - expected_logits).abs().max().item() < TOLERANCE
        # The same bits in every process (the output layer gathers the whole vocabulary's scores
        # everywhere), so that sampling with one seed draws the same tokens in all of them.
        assert torch.equal(result["logits"], results[0]["logits"])
        assert result["from_rank_0"] == 0  # broadcast_tokens shares rank 0's values


def test_torchrun_two_processes_match_one_process(sharded, one_process_result, tmp_path):
    """1 shard (each process cuts its half), 2 shards (one each), 4 shards (each glues two)."""
    folders = [sharded[1], sharded[2], sharded[4]]
    for per_folder in run_with_torchrun(2, folders, tmp_path):
        check_processes_agree_with_one_process(per_folder, one_process_result)


def test_torchrun_four_processes_share_repeated_kv_heads(sharded, one_process_result, tmp_path):
    (per_process,) = run_with_torchrun(4, [sharded[1]], tmp_path)  # 2 KV heads in the file, 1 per process
    check_processes_agree_with_one_process(per_process, one_process_result)
    assert all(result["kv_cache_heads"] == 1 for result in per_process)


@pytest.fixture(scope="module")
def quantized(sharded, tmp_path_factory) -> dict:
    """{scheme: folder}: gqa4 written by the quantize tool."""
    folders = {}
    for scheme in ("int8", "int4"):
        folders[scheme] = tmp_path_factory.mktemp("quantized") / f"gqa4-{scheme}"
        assert quantize_tool.main([str(sharded[1]), str(folders[scheme]), scheme]) == 0
    return folders


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_each_process_gets_its_slice_of_every_quantized_matrix(quantized, scheme, world_size):
    """Dequantized, process r's parts are its slice of the whole dequantized matrix: rows for wq ...
    (with 4 processes, a repeated KV head each), columns for wo and w2, whose int8 scales (one per
    output row) every process keeps whole."""
    folder = quantized[scheme]
    args = args_for_model_parallel(model_args(folder), world_size)
    whole = local_state_dict(shard_paths(folder), 0, 1, model_args(folder))
    for rank in range(world_size):
        local = local_state_dict(shard_paths(folder), rank, world_size, args)
        for matrix in ("layers.1.attention.wq.weight", "layers.1.attention.wk.weight", "layers.1.attention.wo.weight",
                       "layers.1.feed_forward.w2.weight", "tok_embeddings.weight"):
            expected = slice_of(dequantized(whole, matrix, scheme), matrix, rank, world_size, args)
            assert torch.equal(dequantized(local, matrix, scheme), expected), (matrix, rank)


def dequantized(tensors: dict, matrix: str, scheme: str) -> torch.Tensor:
    if scheme == "int8":
        return Int8Weight(tensors[f"{matrix}.values"], tensors[f"{matrix}.scales"]).dequantize(torch.float32)
    return Int4Weight(tensors[f"{matrix}.codes"], tensors[f"{matrix}.scales_and_zeros"], 32, looked_up=False).dequantize(torch.float32)


def slice_of(weight: torch.Tensor, matrix: str, rank: int, world_size: int, args: ModelArgs) -> torch.Tensor:
    """Process `rank`'s part of a whole matrix, from the rules in sharding.py's docstring."""
    if matrix.endswith(("wo.weight", "w2.weight")):
        return weight.chunk(world_size, dim=1)[rank]
    if matrix.endswith("wk.weight") and world_size > weight.shape[0] // args.head_dim:
        heads = weight.unflatten(0, (-1, args.head_dim))  # (stored heads, head_dim, dim)
        return heads[rank // (world_size // heads.shape[0])]
    return weight.chunk(world_size, dim=0)[rank]


def test_torchrun_two_processes_run_a_quantized_folder_as_one_process_does(quantized, tmp_path):
    folders = [quantized["int8"], quantized["int4"]]
    per_folder = run_with_torchrun(2, folders, tmp_path)
    for folder, results in zip(folders, per_folder):
        model, _ = load_llama(folder, dtype=torch.float32, max_seq_len=len(PROMPT) + N_NEW_TOKENS)
        check_processes_agree_with_one_process(results, greedy_decode(model, PROMPT, N_NEW_TOKENS))


def test_run_inference_script_under_torchrun_prints_what_one_process_prints(sharded, tmp_path):
    """The user's command, `torchrun --nproc-per-node 2 run_inference.py`, on the 2-shard folder: rank 0
    alone prints, and the generated text equals a plain `python run_inference.py` on the 1-shard one."""
    repo_root = Path(__file__).resolve().parents[1]
    python_with_settings = [sys.executable, "-c",
                            "import run_inference as r; r.MAX_NEW_TOKENS = 6; r.DTYPE = 'float32'; r.main()"]

    def generated_text(folder: Path, launcher: list) -> str:
        environment = os.environ | {"LLAMA_CHECKPOINT_DIR": str(folder), "OMP_NUM_THREADS": "1",
                                    "TMPDIR": str(tmp_path)}
        finished = subprocess.run([*launcher, *python_with_settings], capture_output=True, text=True,
                                  timeout=180, env=environment, cwd=repo_root)
        assert finished.returncode == 0, finished.stderr[-3000:]
        assert finished.stdout.count("prompt:") == 1  # one report: only rank 0 prints
        return finished.stdout.split("\n\n", 1)[1].split("\nprompt:")[0]  # between model line and timing

    one = generated_text(sharded[1], [])
    # --no-python: torchrun runs the command as given (python -c ...) in each process.
    two = generated_text(sharded[2], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc-per-node", "2", "--no-python"])
    assert one.strip() and one == two


def stopped_by_torchrun(stderr: str, rank: int) -> bool:
    """Whether torchrun's report says it stopped `rank` with SIGTERM: once one process has failed,
    torchrun stops the others, and a process still importing torch (on a busy machine) then ends
    before it could say anything."""
    return re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\s*exitcode\s*: -15\b", stderr) is not None


def test_an_error_under_torchrun_is_said_by_each_process_with_its_rank(sharded, tmp_path):
    """Both processes meet the missing folder: rank 0's line as in one process, rank 1's with its
    number (torchrun then adds its own report of the failed processes), unless torchrun stopped
    rank 1 before it got there."""
    environment = os.environ | {"LLAMA_CHECKPOINT_DIR": str(tmp_path / "no-such-folder"), "OMP_NUM_THREADS": "1",
                                "TMPDIR": str(tmp_path)}
    finished = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "run_inference.py"], capture_output=True, text=True, timeout=180, env=environment,
                              cwd=Path(__file__).resolve().parents[1])
    assert finished.returncode != 0
    line = f"error: no checkpoint folder at {tmp_path / 'no-such-folder'}"
    lines = finished.stderr.splitlines()
    assert sum(text.startswith(line) for text in lines) == 1
    rank_1_said = sum(text.startswith(f"[rank 1] {line}") for text in lines)
    assert rank_1_said == 1 or (rank_1_said == 0 and stopped_by_torchrun(finished.stderr, rank=1)), finished.stderr


def test_a_damaged_shard_is_named_by_the_process_that_reads_it(sharded, tmp_path):
    folder = shutil.copytree(sharded[2], tmp_path / "damaged")
    shard = folder / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    environment = os.environ | {"LLAMA_CHECKPOINT_DIR": str(folder), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    finished = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "run_inference.py"], capture_output=True, text=True, timeout=180, env=environment,
                              cwd=Path(__file__).resolve().parents[1])
    assert finished.returncode != 0
    lines = finished.stderr.splitlines()  # each process's line whole, not run together with another
    assert any(line.startswith(f"[rank 1] error: {shard} could not be read as PyTorch weights") for line in lines)
    # rank 0, whose shard is whole, stops with a line of its own, not at a closed connection
    assert "[rank0]: Traceback" not in finished.stderr and "Connection closed" not in finished.stderr
    assert (any(line.startswith("error: another process could not read its part of the weights") for line in lines)
            or stopped_by_torchrun(finished.stderr, rank=0)), finished.stderr


def test_chat_under_torchrun_answers_as_one_process_does(sharded, tmp_path):
    """CHAT = True with 2 processes: rank 0 reads the piped messages and shares them; both run every
    step; the answers equal one process's on the unsharded checkpoint."""
    repo_root = Path(__file__).resolve().parents[1]
    python_with_settings = [sys.executable, "-c", "import run_inference as r; r.CHAT = True; r.IS_INSTRUCT = True; "
                            "r.MAX_NEW_TOKENS = 6; r.DTYPE = 'float32'; r.SHOW_TOKENS = True; r.main()"]

    def chat_transcript(folder: Path, launcher: list) -> list:
        environment = os.environ | {"LLAMA_CHECKPOINT_DIR": str(folder), "OMP_NUM_THREADS": "1",
                                    "TMPDIR": str(tmp_path)}
        finished = subprocess.run([*launcher, *python_with_settings], input="Hello\nAnd then?\n",
                                  capture_output=True, text=True, timeout=180, env=environment, cwd=repo_root)
        assert finished.returncode == 0, finished.stderr[-3000:]
        assert finished.stdout.count("[prefilled") == 2  # only rank 0 prints, once per turn
        return re.findall(r"^\s+\d+\s+(\d+)\s+[\d.]+%", finished.stdout, re.MULTILINE)  # the answers' ids

    one = chat_transcript(sharded[1], [])
    two = chat_transcript(sharded[2], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc-per-node", "2", "--no-python"])
    assert one and one == two


def test_a_program_that_never_closes_torch_distributed_exits_cleanly(sharded, tmp_path):
    """load_llama under torchrun, then exit without end_model_parallel(): the package closes the
    group at exit. Without that, 1 in 3 two-process gloo runs aborted ("terminate called ...")."""
    code = (f"from llama_models.llama3 import load_llama\nmodel, _ = load_llama({str(sharded[2])!r}, max_seq_len=8)\n"
            "model(__import__('torch').tensor([[1, 2]]), start_pos=0)")
    environment = os.environ | {"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    for _ in range(3):
        finished = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                   "2", "--no-python", sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=120, env=environment)
        assert finished.returncode == 0, finished.stderr[-2000:]
        assert "terminate called" not in finished.stderr
