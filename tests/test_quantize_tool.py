"""python -m llama_models.quantize: a quantized checkpoint folder, written once and loaded as it lies.

The folder must give the model that quantizing at load gives, bit for bit (the same rounding of the
same bfloat16 weights), from one shard or several; it must name its scheme, and be loaded by
load_llama, the scripts and the reshard tool's refusal alike. Bad input is refused in one line
with nothing written.
"""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from checkpoints import TINY_SHAPES, folder_snapshot, write_checkpoint
from llama_models import cli
from llama_models import quantize as tool
from llama_models import reshard
from llama_models.llama3 import LlamaError, ModelArgs, load_llama, products
from llama_models.llama3.quantize import Int4Weight

SCHEMES = ["int8", "int4"]


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    """quantized("gqa4", "int4") -> the folder the tool wrote (once per module)."""
    written = {}

    def make(shape: str, scheme: str):
        if (shape, scheme) not in written:
            folder = tmp_path_factory.mktemp("quantized") / f"{shape}-{scheme}"
            assert tool.main([str(tiny_checkpoint(shape)), str(folder), scheme]) == 0
            written[shape, scheme] = folder
        return written[shape, scheme]

    return make


def with_params(source, folder, edit) -> None:
    """Make `folder` the tool's folder `source` (its files linked) with params.json changed by
    `edit(params) -> params`: a hand-edited copy."""
    folder.mkdir(exist_ok=True)
    for path in source.iterdir():
        if path.name != "params.json" and not (folder / path.name).exists():
            (folder / path.name).symlink_to(path)
    (folder / "params.json").write_text(json.dumps(edit(json.loads((source / "params.json").read_text()))))


def logits_of(model) -> torch.Tensor:
    return model(torch.tensor([[1, 2, 3, 4, 5, 6]]), start_pos=0)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", ["gqa4", "gqa3"])  # tied output (Llama 3.2) and a separate one
def test_the_folder_loads_what_quantizing_at_load_gives(tiny_checkpoint, quantized, one_attention_kernel,
                                                        one_linear_kernel, shape, scheme):
    source = tiny_checkpoint(shape)
    before = folder_snapshot(source)
    folder = quantized(shape, scheme)
    from_folder, _ = load_llama(folder, max_seq_len=16)
    at_load, _ = load_llama(source, max_seq_len=16, quantize=scheme)
    stored, expected = from_folder.state_dict(), at_load.state_dict()
    for name, tensor in stored.items():  # at load, a tied int4 output also keeps its codes for lookups
        assert torch.equal(tensor, expected[name]), name
    assert torch.equal(logits_of(from_folder), logits_of(at_load))
    assert folder_snapshot(source) == before  # SRC is only read
    assert (folder / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    params = json.loads((folder / "params.json").read_text())
    assert params["quantization"] == ({"scheme": "int8"} if scheme == "int8" else {"scheme": "int4", "group_size": 32})


def test_an_int4_folder_and_int4_at_load_run_side_by_side(tmp_path, one_attention_kernel, monkeypatch):
    """A tied output quantized at load keeps its codes (the embedding looks them up), the folder's
    does not: for a prompt the two have different candidates, so their products are kinds apart."""
    monkeypatch.setattr(products, "CPU_CHOOSER", products.KernelChooser(products.CPU_KERNELS))
    # gqa1's shapes, tied: no other matrix has the output layer's shape, so its choice is its own
    source = write_checkpoint(tmp_path / "tied", dict(TINY_SHAPES["gqa1"], with_output=False))
    assert tool.main([str(source), str(tmp_path / "int4"), "int4"]) == 0
    from_folder, _ = load_llama(tmp_path / "int4", max_seq_len=64)
    at_load, _ = load_llama(source, max_seq_len=64, quantize="int4")
    prompt = torch.arange(1, 41)[None]  # (1, 40): a prompt's rows, for which dequantizing is a candidate
    for _ in range(2 * products.TRIALS):  # until every candidate of both kinds has had its trials
        folder_logits, at_load_logits = from_folder(prompt, start_pos=0), at_load(prompt, start_pos=0)
    scale = at_load_logits.float().abs().max()
    assert ((folder_logits.float() - at_load_logits.float()).abs().max() / scale).item() < 0.02  # kernels' rounding
    rows = from_folder.output.weight, at_load.output.weight
    assert products.product_kind(40, rows[0]) != products.product_kind(40, rows[1])


def test_the_file_holds_the_portable_layout_and_a_tied_matrix_once(quantized):
    tensors = torch.load(quantized("gqa4", "int4") / "consolidated.00.pth", weights_only=True)
    assert tensors["layers.0.attention.wq.weight.codes"].dtype == torch.uint8
    assert tensors["layers.0.attention.wq.weight.codes"].shape == (128, 64)  # (out, in / 2)
    assert tensors["layers.0.attention.wq.weight.scales_and_zeros"].shape == (128 // 32, 128, 2)
    assert not any(name.startswith("output.") for name in tensors)  # gqa4 ties output to the embedding
    assert not any(name.endswith(".packed") for name in tensors)  # the CPU kernel's layout is made at load
    int8 = torch.load(quantized("gqa3", "int8") / "consolidated.00.pth", weights_only=True)
    assert int8["output.weight.values"].dtype == torch.int8 and int8["output.weight.scales"].dtype == torch.bfloat16


def test_int4_from_the_folder_keeps_only_the_layouts_its_users_need(quantized):
    model, _ = load_llama(quantized("gqa4", "int4"), max_seq_len=16)
    output, embedding = model.output.weight, model.tok_embeddings.weight
    assert isinstance(output, Int4Weight) and output.packed is not None and output.codes is None
    assert embedding.codes is not None and embedding.packed is None
    # The two share the file's codes; the output layer's packing is the one copy made at load.
    assert output.nbytes + embedding.nbytes < 2.1 * embedding.nbytes


def test_a_folder_in_several_shards_gives_the_same_file(sharded_gqa4, tmp_path):
    """Each matrix is glued whole before quantizing: scales cover whole rows, as with one shard."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert tool.main([str(sharded_gqa4[1]), str(one), "int8"]) == 0
    assert tool.main([str(sharded_gqa4[2]), str(two), "int8"]) == 0
    from_one = torch.load(one / "consolidated.00.pth", weights_only=True)
    from_two = torch.load(two / "consolidated.00.pth", weights_only=True)
    assert from_one.keys() == from_two.keys()
    assert all(torch.equal(from_one[name], from_two[name]) for name in from_one)


@pytest.fixture(scope="module")
def sharded_gqa4(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resharded") / "gqa4-mp2"
    assert reshard.main([str(tiny_checkpoint("gqa4")), str(folder), "2"]) == 0
    return {1: tiny_checkpoint("gqa4"), 2: folder}


def test_the_folder_runs_in_float32_too(quantized):
    """The scales are stored in bfloat16 and widen exactly; the int8 codes stay int8."""
    model, _ = load_llama(quantized("gqa3", "int8"), dtype=torch.float32, max_seq_len=16)
    assert model.output.weight.values.dtype == torch.int8 and model.output.weight.scales.dtype == torch.float32
    assert torch.isfinite(logits_of(model)).all()


@pytest.mark.parametrize("problem, arguments, culprit", [
    ("unknown scheme", ["int3"], "unknown scheme 'int3': use 'int8' or 'int4'"),
    ("fp16", ["fp16"], "fp16 is packed for fbgemm at every load and cannot be stored"),
    ("group size not taken", ["int4", "--group-size", "48"], "int4 group size 48 is not one of 32, 64, 128, 256"),
    ("group size not dividing", ["int4", "--group-size", "64"], "does not divide the input width 96"),
    ("group size zero", ["int4", "--group-size", "0"], "int4 group size 0 is not one of"),
])
def test_bad_arguments_are_one_line_and_write_nothing(tiny_checkpoint, tmp_path, capsys, problem, arguments, culprit):
    source = tiny_checkpoint("gqa3")
    before = folder_snapshot(source)
    assert tool.main([str(source), str(tmp_path / "new"), *arguments]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1 and culprit in message
    assert not (tmp_path / "new").exists() and folder_snapshot(source) == before


def test_an_already_quantized_folder_is_refused(quantized, tmp_path, capsys):
    assert tool.main([str(quantized("gqa4", "int8")), str(tmp_path / "again"), "int4"]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "is already quantized (int8, by this tool)" in message
    assert not (tmp_path / "again").exists()


def test_a_matrix_of_whole_numbers_is_refused(tiny_checkpoint, tmp_path, capsys):
    """Quantizing int32 numbers as if they were weights would write a folder of nonsense."""
    source = Path(shutil.copytree(tiny_checkpoint("gqa4"), tmp_path / "damaged"))
    tensors = torch.load(source / "consolidated.00.pth", weights_only=True)
    tensors["layers.1.feed_forward.w2.weight"] = tensors["layers.1.feed_forward.w2.weight"].to(torch.int32)
    torch.save(tensors, source / "consolidated.00.pth")
    assert tool.main([str(source), str(tmp_path / "new"), "int8"]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "'layers.1.feed_forward.w2.weight'" in message and "torch.int32" in message
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("tool_main, arguments", [(tool.main, ["a", "b", "int4", "--group-size", "abc"]),
                                                   (reshard.main, ["a", "b", "two"]), (reshard.main, [])],
                         ids=["quantize", "reshard", "reshard without arguments"])
def test_a_command_line_that_does_not_parse_is_one_line(capsys, tool_main, arguments):
    with pytest.raises(SystemExit) as exit:
        tool_main(arguments)
    message = capsys.readouterr().err
    assert exit.value.code == 2 and message.startswith("error: ") and message.count("\n") == 1 and "--help" in message


@pytest.mark.parametrize("number", [float("nan"), float("inf")])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_matrix_holding_nan_or_infinity_is_refused(tiny_checkpoint, tmp_path, capsys, number, scheme):
    """Its row's scale would be NaN: a folder that loads, then answers nothing but nonsense."""
    source = Path(shutil.copytree(tiny_checkpoint("gqa4"), tmp_path / "damaged"))
    tensors = torch.load(source / "consolidated.00.pth", weights_only=True)
    tensors["layers.2.feed_forward.w2.weight"][5, 7] = number
    torch.save(tensors, source / "consolidated.00.pth")
    assert tool.main([str(source), str(tmp_path / "new"), scheme]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "layers.2.feed_forward.w2.weight holds NaN or infinite numbers" in message
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("destination", ["inside source", "not empty"])
def test_a_destination_that_would_overwrite_is_refused(tiny_checkpoint, tmp_path, capsys, destination):
    source = tiny_checkpoint("gqa4")
    before = folder_snapshot(source)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    dst = source / "int8" if destination == "inside source" else tmp_path / "busy"
    assert tool.main([str(source), str(dst), "int8"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert folder_snapshot(source) == before and (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert sorted(path.name for path in (tmp_path / "busy").iterdir()) == ["notes.txt"]


def test_an_interrupted_run_leaves_no_folder(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "quantize_into", interrupted)
    assert tool.main([str(tiny_checkpoint("gqa4")), str(tmp_path / "new"), "int8"]) == 130
    assert "interrupted" in capsys.readouterr().err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("nested", [False, True])
def test_a_killed_run_leaves_no_folder(tiny_checkpoint, tmp_path, monkeypatch, nested):
    """kill (SIGTERM) and a closed terminal (SIGHUP) clean up as Ctrl-C does, parents the run made included."""
    def killed(*args, **kwargs):
        cli.raise_killed(signal.SIGTERM, None)

    monkeypatch.setattr(tool, "quantize_into", killed)
    destination = tmp_path / "made" / "by the run" / "int8" if nested else tmp_path / "int8"
    with pytest.raises(cli.Killed):
        tool.main([str(tiny_checkpoint("gqa4")), str(destination), "int8"])
    assert sorted(tmp_path.iterdir()) == []


TOOL_THAT_SIGNALS_ITSELF = """
import os, signal, sys
from llama_models import cli
def main():
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return 0
cli.run_tool(main)
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_killed_tool_ends_by_the_same_signal(name):
    """After cleaning up, the process dies of the signal: its parent sees a kill, not an exit code."""
    finished = subprocess.run([sys.executable, "-c", TOOL_THAT_SIGNALS_ITSELF, name], capture_output=True, timeout=60,
                              text=True)
    assert finished.returncode == -getattr(signal, name), finished.stderr
    assert finished.stderr == f"error: stopped by {name}: what this run wrote is removed\n"


def test_under_nohup_a_closed_terminal_does_not_stop_the_tool():
    finished = subprocess.run([sys.executable, "-c", TOOL_THAT_SIGNALS_ITSELF, "SIGHUP"], capture_output=True,
                              timeout=60, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert finished.returncode == 0, finished.stderr


def test_an_interrupted_reshard_leaves_no_folder(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    written = []

    def interrupted(*args):
        written.append(args[-1])
        args[-1].write_bytes(b"half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(reshard, "write_shard", interrupted)
    assert reshard.main([str(tiny_checkpoint("gqa4")), str(tmp_path / "new"), "2"]) == 130
    assert written and "interrupted" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_reshard_killed_outright_leaves_what_the_loader_names_unfinished(tiny_checkpoint, tmp_path, monkeypatch):
    """SIGKILL cleans nothing up: simulated by a folder context that removes nothing and a second
    shard that never finishes. The first shard is whole, the second still .partial, params.json
    not yet written."""
    import contextlib

    real_write_shard = reshard.write_shard

    def dies_in_the_second_shard(shard_paths, rank, *rest):
        real_write_shard(shard_paths, rank, *rest)
        if rank == 1:
            raise SystemExit("killed")

    monkeypatch.setattr(reshard, "new_folder", lambda dst: contextlib.nullcontext(dst.mkdir()))
    monkeypatch.setattr(reshard, "write_shard", dies_in_the_second_shard)
    folder = tmp_path / "mp2"
    with pytest.raises(SystemExit):
        reshard.reshard(tiny_checkpoint("gqa4"), folder, 2)
    assert sorted(path.name for path in folder.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth.partial"]
    with pytest.raises(LlamaError, match="holds an unfinished copy from llama_models.quantize or reshard"):
        load_llama(folder, max_seq_len=16)


def test_the_tool_runs_as_a_module(tiny_checkpoint, tmp_path):
    finished = subprocess.run([sys.executable, "-m", "llama_models.quantize", str(tiny_checkpoint("gqa4")),
                               str(tmp_path / "int4"), "int4"], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "quantizing to int4: " in finished.stdout and "wrote " in finished.stdout
    assert (tmp_path / "int4" / "consolidated.00.pth").is_file()


def test_load_llama_takes_the_folder_with_its_own_scheme_or_none(quantized, one_attention_kernel):
    folder = quantized("gqa4", "int4")
    as_is, _ = load_llama(folder, max_seq_len=16)
    asked, _ = load_llama(folder, max_seq_len=16, quantize="int4")
    assert torch.equal(logits_of(as_is), logits_of(asked))
    with pytest.raises(LlamaError, match=r"holds int4 weights .* cannot become int8: set QUANTIZE \(quantize=\) to None"):
        load_llama(folder, max_seq_len=16, quantize="int8")


def test_reshard_refuses_a_quantized_folder(quantized, tmp_path):
    with pytest.raises(LlamaError, match=r"is quantized \(int8\): torchrun loads it as it is"):
        reshard.reshard(quantized("gqa4", "int8"), tmp_path / "mp2", 2)


@pytest.mark.parametrize("quantization", [{"scheme": "int3"}, "int8", {"scheme": "int4", "group_size": "32"},
                                          {"scheme": "int8", "bits": 8}, {"scheme": "int4", "group_size": 48},
                                          {"scheme": "int4", "group_size": 32.0}, {"scheme": "int8", "group_size": 32}])
def test_an_odd_quantization_in_params_is_one_line(quantized, tmp_path, quantization):
    folder = tmp_path / "edited"
    with_params(quantized("gqa4", "int8"), folder, lambda params: params | {"quantization": quantization})
    with pytest.raises(LlamaError, match="quantization is .* in params.json: llama_models.quantize writes"):
        load_llama(folder, max_seq_len=16)


def test_an_int4_folder_without_a_group_size_gets_the_default_once():
    """Every reader of params.json (the model's matrices, the process counts that fit) finds the same size."""
    from llama_models.llama3.quantize import GROUP_SIZE

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, quantization={"scheme": "int4"})
    assert args.quantization == {"scheme": "int4", "group_size": GROUP_SIZE}


@pytest.mark.parametrize("tool_main, argument", [(tool.main, "int8"), (reshard.main, "2")], ids=["quantize", "reshard"])
def test_a_new_name_without_instruct_gets_a_note(tiny_checkpoint, tmp_path, capsys, tool_main, argument):
    """run_inference.py picks the chat format by the folder's name: a copy named without it would
    silently get the plain-text prompt."""
    instruct = tmp_path / "Tiny-Instruct"
    instruct.mkdir()
    for path in tiny_checkpoint("gqa4").iterdir():
        (instruct / path.name).symlink_to(path)
    assert tool_main([str(instruct), str(tmp_path / "tiny-copy"), argument]) == 0
    assert "note: run_inference.py uses the chat format" in capsys.readouterr().out
    assert tool_main([str(instruct), str(tmp_path / "Tiny-Instruct-copy"), argument]) == 0
    assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["disk full", "disk full, without posix_fallocate (macOS)",
                                     "group size with int8", "under torchrun"])
def test_the_tool_refuses_in_one_line_and_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys, problem):
    """A full disk shows when the file's room is reserved, before any write through the mapping
    (which would kill the process instead)."""
    arguments = [str(tiny_checkpoint("gqa4")), str(tmp_path / "new"), "int8"]
    if problem == "disk full":
        def no_space(fd, offset, length):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(tool.os, "posix_fallocate", no_space)
    elif problem.startswith("disk full"):
        monkeypatch.delattr(tool.os, "posix_fallocate")
        monkeypatch.setattr(tool.shutil, "disk_usage", lambda path: SimpleNamespace(free=1))
    elif problem == "group size with int8":
        arguments += ["--group-size", "64"]
    else:
        monkeypatch.setenv("RANK", "0")
    assert tool.main(arguments) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1, message
    assert {"disk full": "No space left on device", "group size with int8": "--group-size is for int4",
            "disk full, without posix_fallocate (macOS)": "do not fit in the free space of",
            "under torchrun": "not under torchrun"}[problem] in message
    assert not (tmp_path / "new").exists()


def test_a_quantized_folder_without_its_params_entry_is_named(quantized, tmp_path):
    folder = tmp_path / "lost"
    with_params(quantized("gqa4", "int8"), folder,
                lambda params: {key: value for key, value in params.items() if key != "quantization"})
    with pytest.raises(LlamaError, match='that params.json does not announce: it was written by llama_models.quantize'):
        load_llama(folder, max_seq_len=16)


def test_process_counts_that_would_cut_an_int4_group_are_refused():
    from llama_models.llama3 import ModelArgs
    from llama_models.llama3.sharding import valid_world_sizes

    llama_8b = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3)
    assert 16 in valid_world_sizes(ModelArgs(**llama_8b))
    int4_256 = ModelArgs(**llama_8b, quantization={"scheme": "int4", "group_size": 256})
    assert 16 not in valid_world_sizes(int4_256)  # w2's 14336 inputs / 16 = 896, not a whole number of groups
    assert 8 in valid_world_sizes(int4_256)


def test_a_killed_run_is_named_as_such(tiny_checkpoint, tmp_path, capsys):
    """A process killed outright (out of memory) cleans nothing up: its unfinished file is named, by
    the tool run again and by the loader, instead of "already exists" or "download again"."""
    unfinished = tmp_path / "killed"
    unfinished.mkdir()
    (unfinished / "consolidated.00.pth.partial").write_bytes(b"\0" * 64)
    assert tool.main([str(tiny_checkpoint("gqa4")), str(unfinished), "int8"]) == 2
    assert f"{unfinished} holds an unfinished copy (a run that was killed): delete" in capsys.readouterr().err
    with pytest.raises(LlamaError, match="holds an unfinished copy from llama_models.quantize or reshard"):
        load_llama(unfinished, max_seq_len=16)


def test_params_naming_the_other_scheme_is_named(quantized, tmp_path):
    for quantization, said in (({"scheme": "int8"}, "params.json's scheme, int8, does not describe: "),
                               ({"scheme": "int4", "group_size": 64}, "")):
        with_params(quantized("gqa4", "int4"), tmp_path / "swapped", lambda params: params | {"quantization": quantization})
        with pytest.raises(LlamaError, match=said + "(.*)params.json's \"quantization\" must say how"):
            load_llama(tmp_path / "swapped", max_seq_len=16)
