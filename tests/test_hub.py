"""`finetune push` with the real huggingface_hub client against a stand-in hub on loopback (no network), and the
pushed repo read back by `finetune predict` and by the card's own usage snippet.

The stand-in answers the endpoints the installed huggingface_hub calls to create a repo and a branch, list a tree,
validate the card's metadata, ask which files are large (preupload), upload them over the LFS basic transfer, commit
(ndjson), read repo info and download files; shapes follow hf_api.create_repo / create_branch / list_repo_tree /
repo_info / _validate_yaml, _commit_api._fetch_upload_modes / _send_commit, lfs.post_lfs_batch_info / lfs_upload and
file_download.get_hf_file_metadata. Every request is logged, so the tests assert what was sent. Not exercised: the
Xet transfer that huggingface_hub uses for large files when hf_xet is installed (HF_HUB_DISABLE_XET=1 here), and
the real hub's authorisation rules beyond a bearer-token check.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from conftest import call_main, one_error_line, recipe_dict, run_cli, subprocess_env, to_recipe, write_recipe

LFS_SUFFIXES = (".safetensors", ".png", ".bin", ".pt")  # what the hub's default .gitattributes stores as large files


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    """State of the stand-in hub; `url` is what HF_ENDPOINT should be set to."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {"sha", "files"}}}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict] = []  # what each commit call sent: repo, revision, summary, files, lfs, deleted
        self.lfs_puts: list[str] = []
        self.fail_next_commit_with: int | None = None  # answer the next commit with this status (then recover)
        self.malformed: dict[str, object] = {}  # path -> a 200 JSON answer of the wrong shape, sent instead
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """path -> content of a branch, large files resolved from the LFS store."""
        stored = self.repos[repo_id]["branches"][branch]["files"]
        return {path: self.lfs[f["lfs"]] if "lfs" in f else f["content"] for path, f in stored.items()}

    def calls(self, method: str, fragment: str) -> int:
        return sum(1 for m, path in self.requests if m == method and fragment in path)


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet test output
            pass

        # --- plumbing -----------------------------------------------------------------------------------------

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
            body = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, message: str):
            self._send(status, {"error": message}, headers={"X-Error-Message": message})

        def _authorised(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._error(401, "Invalid credentials in Authorization header")
            return False

        def _route(self, method: str):
            path = unquote(urlparse(self.path).path)
            with hub.lock:
                hub.requests.append((method, path))
            parts = path.strip("/").split("/")
            if path in hub.malformed:
                self._body()
                return self._send(200, hub.malformed[path])
            try:
                handled = getattr(self, f"_{method.lower()}")(path, parts)
            except Exception as error:  # a bug in the stand-in: say so instead of hanging the client
                self._error(500, f"fake hub: {error.__class__.__name__}: {error}")
                return
            if handled is False:
                self._error(404, f"fake hub: no route for {method} {path}")

        def do_GET(self):
            self._route("GET")

        def do_HEAD(self):
            self._route("HEAD")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def _repo(self, repo_id: str, branch: str | None = None):
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
                return None
            if branch is not None and _find_branch(repo, branch) is None:
                self._send(404, {"error": "Invalid rev id"}, headers={"X-Error-Code": "RevisionNotFound"})
                return None
            return repo

        # --- endpoints ----------------------------------------------------------------------------------------

        def _post(self, path: str, parts: list[str]):
            body = self._body()
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            if not self._authorised():
                return None
            if path == "/api/repos/create":
                request = json.loads(body)
                repo_id = f"{request['organization']}/{request['name']}"
                with hub.lock:
                    if repo_id in hub.repos:
                        return self._send(
                            409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                        )
                    hub.repos[repo_id] = {  # the visibility asked for; no field at all means public, as on the hub
                        "private": request.get("visibility") == "private" or request.get("private") is True,
                        "branches": {"main": {"sha": "0" * 40, "files": {}}},
                    }
                return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if path.endswith("/info/lfs/objects/batch"):  # /{owner}/{name}.git/info/lfs/objects/batch
                request = json.loads(body)
                objects = []
                for item in request["objects"]:
                    entry = {"oid": item["oid"], "size": item["size"]}
                    if item["oid"] not in hub.lfs:  # already stored: no actions, the client skips the upload
                        entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-storage/{item['oid']}", "header": {}}}
                    objects.append(entry)
                return self._send(200, {"transfer": "basic", "objects": objects})
            if parts[:2] != ["api", "models"] or len(parts) < 6:
                return False
            repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if action == "branch":
                repo = self._repo(repo_id)
                if repo is None:
                    return None
                with hub.lock:
                    if revision in repo["branches"]:
                        return self._send(409, {"error": "Reference already exists"})
                    main = repo["branches"]["main"]
                    repo["branches"][revision] = {"sha": main["sha"], "files": dict(main["files"])}
                return self._send(200, {})
            repo = self._repo(repo_id, revision)
            if repo is None:
                return None
            files = repo["branches"][revision]["files"]
            if action == "preupload":
                answer = []
                for item in json.loads(body)["files"]:
                    mode = "lfs" if item["path"].endswith(LFS_SUFFIXES) and item["size"] > 0 else "regular"
                    existing = files.get(item["path"])
                    oid = None if existing is None else existing.get("lfs") or existing["oid"]
                    answer.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
                return self._send(200, {"files": answer})
            if action == "commit":
                return self._commit(repo_id, repo, revision, body)
            return False

        def _commit(self, repo_id: str, repo: dict, revision: str, body: bytes):
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            sent = {"repo": repo_id, "revision": revision, "summary": None, "files": {}, "lfs": {}, "deleted": []}
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    sent["summary"] = value["summary"]
                elif key == "file":
                    sent["files"][value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    sent["lfs"][value["path"]] = value["oid"]
                elif key in ("deletedFile", "deletedFolder"):
                    sent["deleted"].append(value["path"])
            with hub.lock:
                hub.commits.append(sent)
                if hub.fail_next_commit_with is not None:
                    status, hub.fail_next_commit_with = hub.fail_next_commit_with, None
                    return self._error(status, "fake hub: commit failed on purpose")
                missing = [oid for oid in sent["lfs"].values() if oid not in hub.lfs]
                if missing:
                    return self._error(422, f"LFS objects not uploaded: {missing}")
                branch = repo["branches"][revision]
                files = dict(branch["files"])
                for path in sent["deleted"]:
                    files.pop(path, None)
                for path, content in sent["files"].items():
                    files[path] = {"content": content, "oid": git_blob_sha1(content)}
                for path, oid in sent["lfs"].items():
                    files[path] = {"lfs": oid, "oid": git_blob_sha1(hub.lfs[oid])}
                sha = hashlib.sha1(json.dumps([branch["sha"], sorted(files)], default=str).encode()).hexdigest()
                repo["branches"][revision] = {"sha": sha, "files": files}
            return self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha})

        def _put(self, path: str, parts: list[str]):
            if parts[0] != "lfs-storage":
                return False
            content = self._body()
            oid = parts[1]
            if hashlib.sha256(content).hexdigest() != oid:
                return self._error(400, "sha256 mismatch")
            with hub.lock:
                hub.lfs[oid] = content
                hub.lfs_puts.append(oid)
            return self._send(200, {})

        def _get(self, path: str, parts: list[str]):
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("tree", "revision"):
                repo_id, revision = f"{parts[2]}/{parts[3]}", parts[5]
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return None
                branch = _find_branch(repo, revision)
                if parts[4] == "tree":
                    listing = []
                    for name, f in sorted(branch["files"].items()):
                        size = len(hub.lfs[f["lfs"]]) if "lfs" in f else len(f["content"])
                        entry = {"type": "file", "path": name, "size": size, "oid": f["oid"]}
                        if "lfs" in f:
                            entry["lfs"] = {"oid": f["lfs"], "size": size, "pointerSize": 134}
                        listing.append(entry)
                    return self._send(200, listing)
                siblings = [{"rfilename": name} for name in sorted(branch["files"])]
                return self._send(
                    200, {"id": repo_id, "sha": branch["sha"], "private": repo["private"], "siblings": siblings}
                )
            if len(parts) >= 5 and parts[2] == "resolve":  # /{owner}/{name}/resolve/{revision}/{path}
                return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            return False

        def _head(self, path: str, parts: list[str]):
            return self._get(path, parts)

        def _resolve(self, repo_id: str, revision: str, name: str):
            repo = hub.repos.get(repo_id)
            branch = None if repo is None else _find_branch(repo, revision)
            if branch is None or name not in branch["files"]:
                return self._send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"})
            f = branch["files"][name]
            content = hub.lfs[f["lfs"]] if "lfs" in f else f["content"]
            etag = f["lfs"] if "lfs" in f else f["oid"]
            return self._send(200, raw=content, headers={"X-Repo-Commit": branch["sha"], "ETag": f'"{etag}"'})

    return Handler


def _find_branch(repo: dict, revision: str) -> dict | None:
    """A branch by name, or by its head commit (the client resolves a branch first, then reads by commit)."""
    if revision in repo["branches"]:
        return repo["branches"][revision]
    return next((b for b in repo["branches"].values() if b["sha"] == revision), None)


# ---------------------------------------------------------------------------------------------------------------
# helpers and fixtures

TOKEN = "hf_stand_in_token_not_real_0123456789"


@pytest.fixture(scope="module")
def run_dir(tiny_bert, tiny_data, tmp_path_factory) -> Path:
    """A finished tiny run (native transformers model/), trained in-process."""
    from finetune.train import train

    out = tmp_path_factory.mktemp("hub-run") / "run"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, out)))
    return out


def hub_env(url: str, home: Path, token: str | None = TOKEN) -> dict:
    """The client pointed at the stand-in: online, legacy LFS transfer, an empty hub home (no stored login)."""
    return dict(HF_ENDPOINT=url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_TOKEN=token or "")


def push(url: str, home: Path, run: Path, repo_id: str, *options, token: str | None = TOKEN):
    return run_cli("push", run, "--repo-id", repo_id, *options, **hub_env(url, home, token))


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_no_token_anywhere(folder: Path, *outputs: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for text in outputs:
        assert TOKEN not in text


# ---------------------------------------------------------------------------------------------------------------
# one repo pushed three times: a failed commit, the retry, and a push with nothing new


@pytest.fixture(scope="module")
def pushed(run_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    before = tree_digest(run_dir)
    with FakeHub(TOKEN) as hub:
        hub.fail_next_commit_with = 500
        failed = push(hub.url, home, run_dir, "me/tiny-topics", "--private")
        uploads_after_failure = list(hub.lfs_puts)
        retried = push(hub.url, home, run_dir, "me/tiny-topics", "--private")
        commits_after_retry, uploads_after_retry = len(hub.commits), list(hub.lfs_puts)
        again = push(hub.url, home, run_dir, "me/tiny-topics", "--private")
        yield {
            "hub": hub, "home": home, "failed": failed, "retried": retried, "again": again, "before": before,
            "uploads_after_failure": uploads_after_failure, "uploads_after_retry": uploads_after_retry,
            "commits_after_retry": commits_after_retry,
        }


def test_push_uploads_the_model_folder_and_card_in_one_commit(pushed, run_dir):
    hub, result = pushed["hub"], pushed["retried"]
    assert result.returncode == 0, result.stderr[-2000:]
    remote = hub.files("me/tiny-topics")
    local = {
        p.relative_to(run_dir / "model").as_posix(): p.read_bytes()
        for p in (run_dir / "model").rglob("*")
        if p.is_file()
    }
    assert set(remote) == set(local)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(remote)
    assert any(name.startswith("plots/") for name in remote)  # the card's pictures travel with it
    for name, content in local.items():
        if name != "README.md":
            assert remote[name] == content, name
    commit = hub.commits[-1]
    assert commit["summary"] == "finetune: run" and commit["revision"] == "main"
    assert set(commit["lfs"]) == {n for n in local if n.endswith((".safetensors", ".png"))}  # large files went by LFS
    assert set(commit["files"]) == {n for n in local if not n.endswith((".safetensors", ".png"))}
    assert hub.repos["me/tiny-topics"]["private"] is True
    url = result.stdout.strip()
    assert url == f"{hub.url}/me/tiny-topics/commit/{hub.repos['me/tiny-topics']['branches']['main']['sha']}"


def test_the_pushed_card_loads_the_repo_and_the_local_card_is_unchanged(pushed, run_dir):
    remote_card = pushed["hub"].files("me/tiny-topics")["README.md"].decode()
    local_card = (run_dir / "model" / "README.md").read_text()
    assert f'MODEL = "{(run_dir / "model").as_posix()}"' in local_card
    assert 'MODEL = "me/tiny-topics"' in remote_card
    assert remote_card == local_card.replace(f'MODEL = "{(run_dir / "model").as_posix()}"', 'MODEL = "me/tiny-topics"')
    assert tree_digest(run_dir) == pushed["before"]  # three pushes, one of them failed: the run folder is untouched


def test_a_failed_commit_is_one_line_and_the_retry_uploads_nothing_twice(pushed):
    failed = pushed["failed"]
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("finetune: error: push to me/tiny-topics:") and "500" in line
    uploaded = pushed["uploads_after_failure"]
    assert len(uploaded) >= 1  # the large files were stored before the commit failed ...
    assert pushed["uploads_after_retry"] == uploaded  # ... so the retry sent none of them again
    assert len(pushed["hub"].commits) == pushed["commits_after_retry"] == 2  # failed + retried


def test_pushing_again_without_changes_sends_no_data_and_no_commit(pushed):
    hub, again = pushed["hub"], pushed["again"]
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(hub.commits) == pushed["commits_after_retry"]
    assert hub.lfs_puts == pushed["uploads_after_retry"]
    assert again.stdout.strip() == pushed["retried"].stdout.strip()  # the URL of the commit already there


def test_the_token_is_sent_but_never_written_or_printed(pushed, run_dir):
    for name in ("failed", "retried", "again"):
        assert_no_token_anywhere(run_dir, pushed[name].stdout, pushed[name].stderr)
    assert_no_token_anywhere(pushed["home"])  # nothing in the hub home (no login file written)


# ---------------------------------------------------------------------------------------------------------------
# failures that never reach a commit: each one line, exit 2, run untouched


def test_missing_token_bad_token_and_no_network_are_one_line_each(run_dir, tmp_path):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    before = tree_digest(run_dir)
    with FakeHub(TOKEN) as hub:
        cases = {
            "missing": hub_env(hub.url, tmp_path / "a", token=None),
            "refused": hub_env(hub.url, tmp_path / "b", token="hf_wrong_token"),
            "offline": hub_env(closed, tmp_path / "c"),
        }
        started = {
            name: subprocess.Popen(
                [sys.executable, "-m", "finetune", "push", str(run_dir), "--repo-id", "me/x"],
                env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for name, env in cases.items()
        }
        results = {}
        for name, process in started.items():
            out, err = process.communicate(timeout=240)
            results[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        assert hub.repos == {} and hub.commits == []
    lines = {name: one_error_line(result) for name, result in results.items()}
    assert "no hub token" in lines["missing"] and "HF_TOKEN" in lines["missing"]
    assert "401" in lines["refused"] and "hf_wrong_token" not in lines["refused"]
    assert "cannot reach the hub" in lines["offline"]
    assert tree_digest(run_dir) == before


def _run_all(commands: dict[str, list], env: dict) -> dict[str, subprocess.CompletedProcess]:
    """`finetune ARGS` for each name at once (each is a process start and a hub round trip)."""
    started = {
        name: subprocess.Popen([sys.executable, "-m", "finetune", *map(str, args)], env=subprocess_env(**env),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, args in commands.items()
    }
    results = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=240)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return results


def test_push_follows_the_runs_visibility_and_repo_unless_told_otherwise(run_dir, tmp_path):
    public_run = tmp_path / "public-run"  # trained with hub: {repo_id: me/from-recipe, private: false}
    shutil.copytree(run_dir, public_run)
    config = public_run / "config.yaml"
    text = config.read_text()
    assert "repo_id: null\n  private: true" in text
    config.write_text(text.replace("repo_id: null\n  private: true", "repo_id: me/from-recipe\n  private: false"))
    with FakeHub(TOKEN) as hub:
        hub.repos["me/already-public"] = {"private": False, "branches": {"main": {"sha": "0" * 40, "files": {}}}}
        results = _run_all({
            "default": ["push", run_dir, "--repo-id", "me/default"],  # the run's hub.private: true (the default)
            "public": ["push", run_dir, "--repo-id", "me/public", "--public"],
            "recipe": ["push", public_run],
            "private": ["push", public_run, "--repo-id", "me/forced-private", "--private"],
            "refused": ["push", run_dir, "--repo-id", "me/already-public"],
        }, hub_env(hub.url, tmp_path / "home"))
        for name in ("default", "public", "recipe"):
            assert results[name].returncode == 0, (name, results[name].stderr[-2000:])
        assert hub.repos["me/default"]["private"] is True
        assert "a private repo (the run's hub.private)" in results["default"].stderr
        assert hub.repos["me/public"]["private"] is False and "a public repo (--public)" in results["public"].stderr
        assert results["private"].returncode == 0, results["private"].stderr[-2000:]
        assert hub.repos["me/from-recipe"]["private"] is False  # the run's hub.repo_id and hub.private: false
        assert "a public repo (the run's hub.private)" in results["recipe"].stderr
        assert hub.repos["me/forced-private"]["private"] is True and "(--private)" in results["private"].stderr
        assert "model.safetensors" in hub.files("me/from-recipe")
        # an existing public repo is not pushed to when the run asks for privacy
        line = one_error_line(results["refused"])
        assert "me/already-public" in line and "public" in line and "--public" in line
        assert hub.files("me/already-public") == {}
    refused = {c["repo"] for c in hub.commits}
    assert "me/already-public" not in refused


def test_pushing_to_an_existing_repo_says_it_keeps_its_visibility(run_dir, tmp_path):
    with FakeHub(TOKEN) as hub:
        hub.repos["me/kept"] = {"private": True, "branches": {"main": {"sha": "0" * 40, "files": {}}}}
        result = push(hub.url, tmp_path / "home", run_dir, "me/kept", "--public")
        assert result.returncode == 0, result.stderr[-2000:]
        assert hub.repos["me/kept"]["private"] is True
        assert "a private repo (it already existed; --public does not change" in result.stderr


def test_a_malformed_hub_answer_is_one_line_naming_the_step(run_dir, tmp_path):
    with FakeHub(TOKEN) as hub:
        hub.malformed["/api/repos/create"] = ["not", "a", "repo"]
        created = push(hub.url, tmp_path / "a", run_dir, "me/odd")
        hub.malformed = {"/api/models/me/odd2/commit/main": {"unexpected": "shape"}}
        committed = push(hub.url, tmp_path / "b", run_dir, "me/odd2")
    for result, step in ((created, "create the repo"), (committed, "commit")):
        line = one_error_line(result)
        assert f"push to me/{'odd' if step != 'commit' else 'odd2'}: {step}:" in line, line
        assert "internal error" not in line and "the hub's answer was not what huggingface_hub expects" in line
        assert TOKEN not in line


def test_push_refuses_a_folder_without_a_model(tmp_path, capfd):
    (tmp_path / "half").mkdir()
    result = call_main(capfd, "push", tmp_path / "half", "--repo-id", "me/x")
    assert result.returncode == 2 and "no model/ folder" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# a branch, an adapter folder, files of an earlier push; and the repo read back


@pytest.mark.slow
def test_revision_adapter_and_stale_files(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}\n')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"stand-in adapter weights")
    (run / "model" / "finetune.json").write_text("{}\n")  # as if an earlier model was in the kit format
    with FakeHub(TOKEN) as hub:
        first = push(hub.url, tmp_path / "home", run, "me/branchy", "--revision", "v1")
        assert first.returncode == 0, first.stderr[-2000:]
        files = hub.files("me/branchy", "v1")
        assert files["adapter/adapter_config.json"] == (run / "adapter" / "adapter_config.json").read_bytes()
        assert "adapter/adapter_model.safetensors" in hub.commits[-1]["lfs"]
        assert hub.files("me/branchy", "main") == {}  # the branch, not main
        (run / "model" / "finetune.json").unlink()
        second = push(hub.url, tmp_path / "home", run, "me/branchy", "--revision", "v1")
        assert second.returncode == 0, second.stderr[-2000:]
        assert hub.commits[-1]["deleted"] == ["finetune.json"]
        assert "finetune.json" not in hub.files("me/branchy", "v1")
        assert not hub.commits[-1]["files"] and not hub.commits[-1]["lfs"]  # nothing else changed


@pytest.mark.slow
def test_predict_and_the_card_snippet_read_the_pushed_repo(pushed, run_dir, tmp_path):
    """`finetune predict OWNER/NAME` and the hub card's own snippet download from the stand-in and agree with the
    local model."""
    hub = pushed["hub"]
    env = hub_env(hub.url, tmp_path / "reader")
    texts = ["the bread today", "a goal of news"]
    local = run_cli("predict", run_dir, *texts, "--json")
    remote = run_cli("predict", "me/tiny-topics", *texts, "--json", **env)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr[-2000:]
    local_rows, remote_rows = ([json.loads(row) for row in r.stdout.splitlines()] for r in (local, remote))
    assert [r["label"] for r in remote_rows] == [r["label"] for r in local_rows]
    assert [r["score"] for r in remote_rows] == pytest.approx([r["score"] for r in local_rows], abs=1e-6)
    card = hub.files("me/tiny-topics")["README.md"].decode()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    result = subprocess.run(
        [sys.executable, "-c", snippet], env=subprocess_env(**env), capture_output=True, text=True, timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = ast.literal_eval(result.stdout.strip())  # the pipeline's printed list of {label, score} dicts
    assert {item["label"] for item in scores[0]} == {"food", "sports", "tech"}


# ---------------------------------------------------------------------------------------------------------------
# hub.repo_id in the recipe: `finetune run` pushes at the end, and a failed push leaves the finished run as it is


# slow (the default suite's time): a whole CLI run; the push itself is tested by default
@pytest.mark.slow
def test_run_pushes_at_the_end_when_the_recipe_names_a_repo(tiny_bert, tiny_data, tmp_path):
    home = tmp_path / "hf-home"
    with FakeHub(TOKEN) as hub:
        out = tmp_path / "run"
        recipe = write_recipe(
            tmp_path / "r.yaml", recipe_dict(tiny_bert, tiny_data, out, **{"hub.repo_id": "me/at-the-end"})
        )
        result = run_cli("run", recipe, **hub_env(hub.url, home))
        assert result.returncode == 0, result.stderr[-2000:]
        assert "pushed to" in (out / "train.log").read_text()
        sent = hub.files("me/at-the-end")
        assert "model.safetensors" in sent and "README.md" in sent and "config.json" in sent
        assert_no_token_anywhere(out, result.stdout, result.stderr)
    # no hub reachable: the run still finishes and says how to push later
    out = tmp_path / "offline"
    recipe = write_recipe(tmp_path / "o.yaml", recipe_dict(tiny_bert, tiny_data, out, **{"hub.repo_id": "me/later"}))
    result = run_cli("run", recipe, **hub_env("http://127.0.0.1:9", home))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "metrics.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert f"finetune push {out} --repo-id me/later --private" in (out / "train.log").read_text()  # hub.private
