"""Tests for the test Hub (tests/hub_server.py), driven by the real huggingface_hub / transformers clients.

The clients run in subprocesses (``run_client``) because HF_ENDPOINT & co. must be set before
``huggingface_hub`` is imported. A network guard in those subprocesses blocks any non-local host.
"""

import base64
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hub_server import HubServer, run_client, running_hub  # noqa: E402


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server
        print("test hub requests (method, path, status):", *server.requests, sep="\n  ")  # shown on failure
        assert server.unknown_routes == [], f"client hit routes the test hub lacks: {server.unknown_routes}"


def _call(url, method="GET", payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Authorization": "Bearer test"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


# --------------------------------------------------------------------------------------------- in-process
def test_running_hub_serves_and_stops():
    with running_hub() as endpoint:
        assert endpoint.startswith("http://127.0.0.1:")
        status, body = _call(f"{endpoint}/api/repos/create", "POST", {"name": "r", "organization": "user"})
        assert status == 200 and body["url"] == f"{endpoint}/user/r"
        status, body = _call(f"{endpoint}/api/repos/create", "POST", {"name": "r", "organization": "user"})
        assert status == 409 and body["url"] == f"{endpoint}/user/r"  # exist_ok relies on this
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{endpoint}/api/whoami-v2", timeout=2)


def test_unknown_route_is_a_loud_404(capfd):
    with HubServer() as server:
        status, body = _call(f"{server.url}/api/definitely/not/a/route?x=1")
        assert status == 404 and "no route for GET /api/definitely/not/a/route" in body["error"]
        assert server.unknown_routes == ["GET /api/definitely/not/a/route?x=1"]
    assert "UNKNOWN ROUTE: GET /api/definitely/not/a/route" in capfd.readouterr().err


def test_preupload_decides_regular_vs_lfs(hub):
    _call(f"{hub.url}/api/repos/create", "POST", {"name": "pre", "organization": "user"})

    def entry(path, data, size=None):
        return {"path": path, "sample": base64.b64encode(data[:512]).decode(), "size": size or len(data)}

    files = [
        entry("README.md", b"# hi\n"),
        entry("model.safetensors", b"tiny"),  # LFS by .gitattributes pattern, whatever the size
        entry("sub/weights.bin", b"tiny"),
        entry("blob.dat", b"\x00\x01binary"),  # binary content => LFS
        entry("huge.txt", b"text", size=11 * 1024 * 1024),  # >= 10MB => LFS
        entry(".gitattributes", b"*.foo filter=lfs\n"),  # exists since the initial commit => oid is returned
    ]
    status, body = _call(f"{hub.url}/api/models/user/pre/preupload/main", "POST", {"files": files})
    assert status == 200
    modes = {f["path"]: f["uploadMode"] for f in body["files"]}
    assert modes == {"README.md": "regular", "model.safetensors": "lfs", "sub/weights.bin": "lfs",
                     "blob.dat": "lfs", "huge.txt": "lfs", ".gitattributes": "regular"}
    assert all(f["shouldIgnore"] is False for f in body["files"])
    oids = {f["path"]: f.get("oid") for f in body["files"]}
    assert oids[".gitattributes"] is not None and oids["README.md"] is None

    status, body = _call(f"{hub.url}/api/models/user/missing/preupload/main", "POST", {"files": files})
    assert status == 404


def test_client_network_guard_blocks_real_hosts(tmp_path):
    proc = run_client(
        """
        import socket
        try:
            socket.create_connection(("huggingface.co", 443), timeout=1)
        except OSError as e:
            print("blocked:", e)
        """,
        "http://127.0.0.1:9",
        tmp_path,
    )
    assert "network guard: connection to 'huggingface.co' blocked" in proc.stdout


# --------------------------------------------------------------------------------- huggingface_hub client
def test_upload_folder_list_and_download(hub, tmp_path):
    folder = tmp_path / "upload"
    (folder / "nested").mkdir(parents=True)
    (folder / "notes.txt").write_text("small text file\n")
    (folder / "nested" / "config.json").write_text('{"a": 1}')
    big = os.urandom(300_000)
    (folder / "model.safetensors").write_bytes(big)

    run_client(
        """
        import os, hashlib
        from pathlib import Path
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download

        folder = Path(os.environ["UPLOAD_DIR"])
        api = HfApi()
        url = api.create_repo("user/demo")
        assert url.repo_id == "user/demo", url
        assert api.create_repo("user/demo", exist_ok=True).repo_id == "user/demo"

        info = api.upload_folder(folder_path=folder, repo_id="user/demo", commit_message="add files")
        assert len(info.oid) == 40 and int(info.oid, 16) >= 0, info.oid

        expected = {"notes.txt", "nested/config.json", "model.safetensors"}
        files = api.list_repo_files("user/demo")
        assert set(files) == expected | {".gitattributes"}, files

        for name in expected:  # single-file downloads, bytes-identical
            path = hf_hub_download("user/demo", name)
            assert Path(path).read_bytes() == (folder / name).read_bytes(), name

        snapshot = Path(snapshot_download("user/demo", cache_dir=os.environ["HF_HOME"] + "/other_cache"))
        assert snapshot.name == info.oid
        for name in expected:
            assert (snapshot / name).read_bytes() == (folder / name).read_bytes(), name
        local = Path(snapshot_download("user/demo", local_dir=os.environ["HF_HOME"] + "/local"))
        assert (local / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()

        model = api.model_info("user/demo")
        assert model.sha == info.oid and model.id == "user/demo"
        assert {s.rfilename for s in model.siblings} == expected | {".gitattributes"}
        assert api.repo_info("user/demo").sha == info.oid

        sha256 = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        by_path = {f.path: f for f in api.list_repo_tree("user/demo", recursive=True)}
        assert by_path["model.safetensors"].lfs.sha256 == sha256
        assert by_path["model.safetensors"].size == 300_000
        assert by_path["notes.txt"].lfs is None
        assert type(by_path["nested"]).__name__ == "RepoFolder"
        top = [f.path for f in api.list_repo_tree("user/demo")]
        assert sorted(top) == [".gitattributes", "model.safetensors", "nested", "notes.txt"], top

        infos = {f.path: f for f in api.get_paths_info("user/demo", ["model.safetensors", "nested", "nope"])}
        assert set(infos) == {"model.safetensors", "nested"} and infos["model.safetensors"].lfs.size == 300_000
        assert api.file_exists("user/demo", "nested/config.json")
        assert not api.file_exists("user/demo", "nope.txt")
        assert api.repo_exists("user/demo") and not api.repo_exists("user/nope")
        """,
        hub.url,
        tmp_path / "hf_home",
        env={"UPLOAD_DIR": str(folder)},
    )

    # The large file went through the LFS batch API + basic PUT transfer (to the "CDN" origin), the rest did not.
    sha256 = hashlib.sha256(big).hexdigest()
    assert set(hub.state.blobs) == {sha256}
    paths = [(method, path.split("?")[0]) for method, path, _ in hub.requests]
    assert ("POST", "/user/demo.git/info/lfs/objects/batch") in paths
    assert ("PUT", f"/lfs-upload/{sha256}") in paths
    assert ("GET", f"/lfs-objects/{sha256}") in paths


def test_second_commit_updates_file(hub, tmp_path):
    run_client(
        """
        import re
        from pathlib import Path
        from huggingface_hub import (CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download,
                                     snapshot_download)

        api = HfApi()
        api.create_repo("user/versions")
        first = api.create_commit("user/versions", commit_message="v1", operations=[
            CommitOperationAdd("a.txt", b"version 1\\n"),
            CommitOperationAdd("gone.txt", b"to be deleted\\n"),
            CommitOperationAdd("w.bin", b"\\x00" * 1000),
        ]).oid
        second = api.create_commit("user/versions", commit_message="v2", operations=[
            CommitOperationAdd("a.txt", b"version 2\\n"),
            CommitOperationAdd("w.bin", b"\\x01" * 2000),
            CommitOperationDelete("gone.txt"),
        ]).oid
        assert re.fullmatch("[0-9a-f]{40}", first) and re.fullmatch("[0-9a-f]{40}", second) and first != second

        assert Path(hf_hub_download("user/versions", "a.txt")).read_bytes() == b"version 2\\n"
        assert Path(hf_hub_download("user/versions", "w.bin")).read_bytes() == b"\\x01" * 2000
        assert Path(hf_hub_download("user/versions", "a.txt", revision=first)).read_bytes() == b"version 1\\n"
        assert Path(hf_hub_download("user/versions", "w.bin", revision=first)).read_bytes() == b"\\x00" * 1000
        assert sorted(api.list_repo_files("user/versions")) == [".gitattributes", "a.txt", "w.bin"]
        assert "gone.txt" in api.list_repo_files("user/versions", revision=first)
        assert Path(snapshot_download("user/versions")).name == second

        # Re-uploading identical content is skipped by the client (preupload returns the remote oids).
        same = api.upload_file(path_or_fileobj=b"version 2\\n", path_in_repo="a.txt", repo_id="user/versions")
        assert same.oid == second
        commits = api.list_repo_commits("user/versions")
        assert [c.title for c in commits] == ["v2", "v1", "initial commit"]
        assert [b.target_commit for b in api.list_repo_refs("user/versions").branches] == [second]

        # Pull requests and branches.
        pr = api.upload_file(path_or_fileobj=b"pr\\n", path_in_repo="pr.txt", repo_id="user/versions", create_pr=True)
        assert pr.pr_revision == "refs/pr/1"
        assert Path(hf_hub_download("user/versions", "pr.txt", revision="refs/pr/1")).read_bytes() == b"pr\\n"
        assert "pr.txt" not in api.list_repo_files("user/versions")
        api.create_branch("user/versions", branch="dev")
        api.upload_file(path_or_fileobj=b"dev\\n", path_in_repo="dev.txt", repo_id="user/versions", revision="dev")
        assert "dev.txt" in api.list_repo_files("user/versions", revision="dev")
        """,
        hub.url,
        tmp_path / "hf_home",
    )


def test_errors_map_to_client_exceptions(hub, tmp_path):
    run_client(
        """
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        api = HfApi()
        api.create_repo("user/errs")
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/errs")

        def raises(exc, fn, *args, **kwargs):
            try:
                fn(*args, **kwargs)
            except exc:
                return
            raise AssertionError(f"{fn.__name__}{args} did not raise {exc.__name__}")

        raises(RepositoryNotFoundError, api.model_info, "user/nope")
        raises(RepositoryNotFoundError, hf_hub_download, "user/nope", "x.txt")
        raises(EntryNotFoundError, hf_hub_download, "user/errs", "missing.txt")
        raises(RevisionNotFoundError, hf_hub_download, "user/errs", "x.txt", revision="no-such-branch")
        raises(RevisionNotFoundError, api.model_info, "user/errs", revision="no-such-branch")
        raises(EntryNotFoundError, api.delete_file, "missing.txt", "user/errs")
        """,
        hub.url,
        tmp_path / "hf_home",
    )


# ------------------------------------------------------------------------------------------- transformers
def test_transformers_model_and_processor_round_trip(hub, tmp_path):
    run_client(
        """
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import (AutoProcessor, AutoTokenizer, CLIPImageProcessor, LlamaConfig, LlamaForCausalLM,
                                  LlavaProcessor, PreTrainedTokenizerFast)

        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=100)
        model = LlamaForCausalLM(config)
        commit = model.push_to_hub("user/tiny", token="test")
        loaded = LlamaForCausalLM.from_pretrained("user/tiny")
        expected, actual = model.state_dict(), loaded.state_dict()
        assert expected.keys() == actual.keys()
        for name in expected:
            assert torch.equal(expected[name], actual[name]), name
        assert loaded.config.hidden_size == 32 and loaded.config.num_hidden_layers == 2

        vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<image>", "hello", "world"])}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
        image_processor = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                                   image_token="<image>")
        processor.push_to_hub("user/tiny-processor")
        reloaded = AutoProcessor.from_pretrained("user/tiny-processor")
        assert type(reloaded).__name__ == "LlavaProcessor"
        assert reloaded.tokenizer("hello world").input_ids == tokenizer("hello world").input_ids == [3, 4]
        assert reloaded.image_processor.crop_size["height"] == 8
        assert AutoTokenizer.from_pretrained("user/tiny-processor")("world hello").input_ids == [4, 3]
        """,
        hub.url,
        tmp_path / "hf_home",
        timeout=240,
    )
    assert any(path.startswith("/lfs-upload/") for _, path, _ in hub.requests)  # model.safetensors went via LFS
