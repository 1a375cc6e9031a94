"""The upstream side of the harness against the real thing: docker-registry, skopeo, processes."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import requests

from localcluster import images as image_types
from localcluster import tokenserver
from localcluster.images import ImageBuilder, push
from localcluster.processes import Daemon, DaemonError, free_ports, live_daemons
from localcluster.registry import start_registry
from tests.fixtures.registries import SkopeoError
from tests.oci_checks import assert_dir_matches, copy_to_dir

pytestmark = pytest.mark.component


@pytest.mark.parametrize("oci", [True, False], ids=["oci", "docker"])
@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "tar"])
def test_synthetic_image_round_trips_through_skopeo(registry, images, skopeo, tmp_path, oci, compressed):
    image = images.synthetic(layers=2, layer_size=256 << 10, compressed=compressed, seed=7, oci=oci)
    repository = f"synthetic/{'oci' if oci else 'docker'}-{'gz' if compressed else 'tar'}"

    digest = push(registry, repository, "v1", image)

    assert digest == image.digest
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{repository}:v1")
    assert raw.stdout.encode() == image.manifest
    manifest = json.loads(image.manifest)
    assert manifest["mediaType"] == (image_types.OCI_MANIFEST if oci else image_types.DOCKER_MANIFEST)
    expected_layer = {
        (True, True): image_types.OCI_LAYER_GZIP,
        (True, False): image_types.OCI_LAYER,
        (False, True): image_types.DOCKER_LAYER_GZIP,
        (False, False): image_types.DOCKER_LAYER,
    }[(oci, compressed)]
    assert [layer["mediaType"] for layer in manifest["layers"]] == [expected_layer] * 2
    assert_dir_matches(copy_to_dir(skopeo, f"{registry.host}/{repository}:v1", tmp_path / "copy"), image)


def test_synthetic_layers_hold_seeded_incompressible_bytes(images):
    image = images.synthetic(layers=2, layer_size=300_000, compressed=True, seed=3)
    diff_ids = image.config_json()["rootfs"]["diff_ids"]
    contents = []
    for layer, diff_id in zip(image.layers, diff_ids, strict=True):
        tar_bytes = gzip.decompress(layer.read_bytes())
        assert "sha256:" + hashlib.sha256(tar_bytes).hexdigest() == diff_id
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            member = next(m for m in tar.getmembers() if m.isfile())
            assert (member.size, member.mtime, member.uid) == (300_000, 0, 0)
            data = tar.extractfile(member).read()
        assert len(gzip.compress(data)) > len(data)  # random: gzip cannot shrink it
        contents.append(data)
    assert contents[0] != contents[1]
    assert images.synthetic(layers=2, layer_size=300_000, seed=4).layers[0].digest != image.layers[0].digest


def test_builds_are_deterministic_across_builders_and_cached(tmp_path, images):
    first = ImageBuilder(tmp_path / "a").synthetic(layers=1, layer_size=100_000, seed=11, oci=False)
    second = ImageBuilder(tmp_path / "b").synthetic(layers=1, layer_size=100_000, seed=11, oci=False)
    assert (first.digest, first.manifest) == (second.digest, second.manifest)
    assert ImageBuilder(tmp_path / "a").busybox().digest == ImageBuilder(tmp_path / "b").busybox().digest

    # A new builder on the same directory reuses the files instead of rebuilding them.
    layer_path = first.layers[0].path
    before = layer_path.stat().st_mtime_ns
    again = ImageBuilder(tmp_path / "a").synthetic(layers=1, layer_size=100_000, seed=11, oci=False)
    assert again == first
    assert layer_path.stat().st_mtime_ns == before


def test_large_layers_are_streamed_not_held_in_memory(tmp_path):
    """A 96 MiB layer builds in a child process whose memory grows far less than the layer's size."""
    script = (
        "import resource, sys\n"
        "from localcluster.images import ImageBuilder\n"
        "builder = ImageBuilder(sys.argv[1])\n"
        "baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "image = builder.synthetic(layers=1, layer_size=96 << 20, seed=99)\n"
        "print(image.layers[0].size, baseline, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120, check=True
    )
    size, baseline_kib, peak_kib = map(int, result.stdout.split())
    assert size > 96 << 20
    growth = peak_kib - baseline_kib
    assert growth < 32 << 10, f"memory grew {growth} KiB while building a 96 MiB layer: it was held in memory"


def test_abandoned_temporary_files_are_removed(tmp_path):
    ImageBuilder(tmp_path)
    old, fresh = tmp_path / "tmp" / "old-partial", tmp_path / "tmp" / "fresh-partial"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))

    ImageBuilder(tmp_path)

    assert not old.exists()
    assert fresh.exists()  # may belong to a build running right now in another process


def test_busybox_image_is_runnable_layout(registry, images, skopeo, tmp_path):
    image = images.busybox(entrypoint=["/bin/sh", "-c"], cmd=["echo hello"])
    push(registry, "busybox", "1.36", image)

    config = image.config_json()
    assert config["config"]["Entrypoint"] == ["/bin/sh", "-c"]
    assert config["config"]["Cmd"] == ["echo hello"]
    assert image.media_type == image_types.DOCKER_MANIFEST
    assert image.layers[0].media_type == image_types.DOCKER_LAYER_GZIP
    with tarfile.open(image.layers[0].path, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/busybox"].isfile() and members["bin/busybox"].mode == 0o755
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
    assert members["tmp"].mode == 0o1777
    assert {"etc/passwd", "etc/group", "proc", "sys", "dev"} <= members.keys()
    assert_dir_matches(copy_to_dir(skopeo, f"{registry.host}/busybox:1.36", tmp_path / "copy"), image)


def test_pause_image_sleeps_until_terminated(images):
    pause = images.pause()
    assert pause.config_json()["config"]["Entrypoint"] == list(image_types.PAUSE_ENTRYPOINT)
    assert pause.layers == images.busybox().layers  # same layer, different config
    # The entrypoint really waits and exits 0 on TERM (run with the host's busybox).
    process = subprocess.Popen(["/bin/busybox", *image_types.PAUSE_ENTRYPOINT])
    time.sleep(0.3)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    assert process.wait(5) == 0


def test_index_pushes_platform_manifests_first(registry, images, skopeo):
    amd = images.synthetic(layers=1, layer_size=64 << 10, seed=21, platform="linux/amd64")
    arm = images.synthetic(layers=1, layer_size=64 << 10, seed=22, platform="linux/arm64")
    index = images.index({"linux/amd64": amd, "linux/arm64": arm})
    before = len(registry.requests())

    assert push(registry, "multi", "v1", index) == index.digest

    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/multi:v1")
    assert raw.stdout.encode() == index.manifest
    assert json.loads(index.manifest)["mediaType"] == image_types.OCI_INDEX
    for arch, image in (("amd64", amd), ("arm64", arm)):
        chosen = skopeo(
            "--override-arch", arch, "inspect", "--tls-verify=false", f"docker://{registry.host}/multi:v1"
        )
        assert json.loads(chosen.stdout)["Layers"] == [image.layers[0].digest]
    manifest_puts = [
        path for method, path, _ in registry.requests()[before:] if method == "PUT" and "/manifests/" in path
    ]
    assert manifest_puts[-1] == "/v2/multi/manifests/v1"
    assert {f"/v2/multi/manifests/{amd.digest}", f"/v2/multi/manifests/{arm.digest}"} == set(
        manifest_puts[:-1]
    )


def test_auth_registry_refuses_anonymous_and_accepts_credentials(auth_registry, images, skopeo, tmp_path):
    image = images.synthetic(layers=1, layer_size=32 << 10, seed=31)
    push(auth_registry, "private/app", "1", image)
    reference = f"{auth_registry.host}/private/app:1"

    anonymous = requests.get(f"{auth_registry.url}/v2/private/app/manifests/1", timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")
    wrong = requests.get(f"{auth_registry.url}/v2/", auth=(auth_registry.username, "wrong"), timeout=10)
    assert wrong.status_code == 401
    with pytest.raises(SkopeoError, match=r"unauthorized|authentication required"):
        skopeo("inspect", "--tls-verify=false", "--no-creds", f"docker://{reference}")

    creds = f"{auth_registry.username}:{auth_registry.password}"
    inspected = skopeo("inspect", "--tls-verify=false", "--creds", creds, f"docker://{reference}")
    assert json.loads(inspected.stdout)["Digest"] == image.digest
    copied = copy_to_dir(skopeo, reference, tmp_path / "copy", "--src-creds", creds)
    assert_dir_matches(copied, image)


def test_anonymous_push_to_auth_registry_names_the_refusal(auth_registry, images):
    class Anonymous:
        url = auth_registry.url

    with pytest.raises(image_types.PushError, match="401"):
        push(Anonymous(), "private/denied", "1", images.synthetic(layers=1, layer_size=1024, seed=32))


def test_chunked_and_monolithic_uploads_store_the_same_blobs(registry_factory, images):
    image = images.synthetic(layers=2, layer_size=1 << 20, seed=41)
    monolithic, chunked = registry_factory(), registry_factory()

    assert push(monolithic, "app", "1", image) == push(
        chunked, "app", "1", image, chunked=True, chunk_size=300_000
    )

    chunked_requests = chunked.requests()
    patches = [path for method, path, status in chunked_requests if method == "PATCH" and status == 202]
    assert len(patches) == sum(math.ceil(blob.size / 300_000) for blob in image.blobs) == 9
    assert not any(method == "PATCH" for method, _, _ in monolithic.requests())
    for blob in image.blobs:
        for target in (monolithic, chunked):
            served = requests.get(f"{target.url}/v2/app/blobs/{blob.digest}", timeout=10)
            assert served.status_code == 200
            assert served.content == blob.read_bytes()


def test_push_skips_blobs_the_registry_has(registry_factory, images):
    image = images.synthetic(layers=2, layer_size=64 << 10, seed=51)
    target = registry_factory()
    push(target, "app", "1", image)
    before = len(target.requests())

    push(target, "app", "2", image)

    second = target.requests()[before:]
    assert [m for m, _, _ in second if m in ("POST", "PATCH")] == []
    assert [(m, s) for m, p, s in second if "/blobs/" in p] == [("HEAD", 200)] * 3


def test_requests_sees_each_blob_get_once(registry_factory, images, skopeo, tmp_path):
    image = images.synthetic(layers=3, layer_size=64 << 10, seed=61)
    target = registry_factory()
    push(target, "seen", "1", image)
    before = len(target.requests())

    copy_to_dir(skopeo, f"{target.host}/seen:1", tmp_path / "copy")

    gets = [(p, s) for m, p, s in target.requests()[before:] if m == "GET" and "/blobs/" in p]
    assert sorted(gets) == sorted((f"/v2/seen/blobs/{blob.digest}", 200) for blob in image.blobs)


def test_stop_and_start_keep_port_and_content(registry_factory, images, skopeo):
    image = images.synthetic(layers=1, layer_size=64 << 10, seed=71)
    target = registry_factory(auth=True)
    push(target, "kept", "1", image)
    url = target.url

    target.stop()
    assert not target.running
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v2/", timeout=2)
    target.start()

    assert target.url == url
    answer = requests.get(
        f"{url}/v2/kept/manifests/1", auth=target.auth, headers={"Accept": image.media_type}, timeout=10
    )
    assert answer.status_code == 200 and answer.content == image.manifest
    requests_after = [r for r in target.requests() if r[1] == "/v2/kept/manifests/1"]
    assert requests_after[-1] == ("GET", "/v2/kept/manifests/1", 200)


def test_pull_through_cache_serves_hits_without_upstream(registry_factory, images):
    image = images.synthetic(layers=1, layer_size=128 << 10, seed=81)
    # An open upstream: distribution 2.8's pull-through cache sends credentials only to bearer-token
    # upstreams (distribution/distribution#3153), never basic auth.
    upstream = registry_factory()
    push(upstream, "library/app", "1", image)
    cache = registry_factory(proxy_remote_url=upstream.url)
    layer = image.layers[0]

    def fetch() -> None:
        served = requests.get(f"{cache.url}/v2/library/app/blobs/{layer.digest}", timeout=30)
        assert served.status_code == 200 and served.content == layer.read_bytes()

    def upstream_blob_gets() -> list[tuple[str, str, int]]:
        return [r for r in upstream.requests() if r[0] == "GET" and r[1].endswith(layer.digest)]

    fetch()
    # distribution 2.8 serves a miss from one upstream GET and stores it from a second, concurrent
    # one (worth knowing for the benchmark anchor); wait for the stored copy to be committed.
    hex_digest = layer.digest.split(":")[1]
    stored = cache.storage_dir / f"docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
    deadline = time.monotonic() + 10
    while not stored.is_file():
        assert time.monotonic() < deadline, f"the cache never stored {layer.digest}"
        time.sleep(0.05)
    time.sleep(0.2)
    misses = upstream_blob_gets()
    assert 1 <= len(misses) <= 2
    assert set(misses) == {("GET", f"/v2/library/app/blobs/{layer.digest}", 200)}

    fetch()
    fetch()

    assert upstream_blob_gets() == misses  # hits are served from the cache alone
    with pytest.raises(image_types.PushError):
        push(cache, "library/other", "1", image)  # a pull-through cache refuses pushes


def test_registry_failing_to_start_reports_its_log(tmp_path, registry):
    with pytest.raises(DaemonError, match="address already in use"):
        start_registry(tmp_path / "clash", port=registry.port, timeout=10)


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(1024 <= port < 65536 for port in ports)


def test_daemon_stop_ends_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    daemon = Daemon(
        "group", ["/bin/sh", "-c", f"trap '' TERM; sleep 300 & echo $! > {pid_file}; wait"], tmp_path / "log"
    ).start()
    deadline = time.monotonic() + 5
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child = int(pid_file.read_text())
    assert daemon in live_daemons()

    daemon.stop(timeout=1)  # the shell ignores TERM: KILL after the timeout

    assert daemon not in live_daemons()
    assert not daemon.running
    time.sleep(0.1)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z")


def test_daemon_never_signals_a_process_whose_cmdline_does_not_match(tmp_path):
    daemon = Daemon("impostor", ["sleep", "300"], tmp_path / "log", marker="not-in-its-cmdline").start()
    try:
        with pytest.raises(DaemonError, match="refusing to signal"):
            daemon.stop(timeout=0.5)
        assert daemon.running  # neither TERM nor KILL was sent
    finally:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon._popen.wait(5)


def test_daemon_reports_early_exit_with_its_log(tmp_path):
    daemon = Daemon(
        "broken", ["/bin/sh", "-c", "echo cannot bind: something; exit 3"], tmp_path / "log"
    ).start()
    with pytest.raises(DaemonError, match=r"(?s)exited \(code 3\).*cannot bind"):
        daemon.wait_port(free_ports(1)[0], timeout=5)
    daemon.stop()


DAEMON_OWNER = """
import sys
from pathlib import Path
from localcluster.processes import Daemon
daemon = Daemon("sleeper", ["sleep", "300"], Path(sys.argv[1]) / "log").start()
print(daemon.pid, flush=True)
sys.stdin.readline()  # exit normally when the test closes our stdin (or die by its signal)
"""


def _gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(") ")[1].startswith("Z")


@pytest.mark.parametrize("ending", ["exit", "SIGTERM", "SIGHUP", "SIGINT"])
def test_daemons_do_not_outlive_their_owner(tmp_path, ending):
    owner = subprocess.Popen(
        [sys.executable, "-c", DAEMON_OWNER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    pid = int(owner.stdout.readline())
    assert not _gone(pid)
    if ending == "exit":
        owner.stdin.close()
    else:
        owner.send_signal(getattr(signal, ending))
    owner.wait(20)
    deadline = time.monotonic() + 10
    while not _gone(pid):
        assert time.monotonic() < deadline, f"daemon {pid} outlived its owner ({ending})"
        time.sleep(0.05)


def test_a_forked_child_leaves_its_parents_daemons_alone(tmp_path):
    daemon = Daemon("parent-owned", ["sleep", "300"], tmp_path / "log").start()
    try:
        child = os.fork()
        if child == 0:  # the child exits through atexit, as a forked worker might
            import atexit

            inherited = live_daemons()
            atexit._run_exitfuncs()
            os._exit(1 if inherited else 0)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert daemon.running
    finally:
        daemon.stop()


# --- bearer-token auth (auth.token with our own token server) --------------------------------------


def _bearer_get(registry, path: str, token: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}", "Accept": image_types.OCI_MANIFEST}
    return requests.get(f"{registry.url}{path}", headers=headers, timeout=10)


def _with_claims(token: str, claims: dict) -> str:
    """``token`` with its claims swapped for ``claims`` but its original signature kept."""
    header, _, signature = token.split(".")
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{payload}.{signature}"


def _token(registry, scope: str, auth=None) -> str:
    params = {"service": registry.token_server.service, "scope": scope}
    response = requests.get(registry.token_server.realm, params=params, auth=auth, timeout=10)
    response.raise_for_status()
    return response.json()["token"]


def test_token_registry_serves_credentials_and_refuses_anonymous_and_wrong_passwords(
    token_registry, images, skopeo, tmp_path
):
    image = images.synthetic(layers=2, layer_size=150_000, seed=40)
    digest = push(token_registry, "private/token-app", "v1", image, chunked=True, chunk_size=64 << 10)
    assert digest == image.digest
    challenge = requests.get(f"{token_registry.url}/v2/", timeout=10).headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer realm="{token_registry.token_server.realm}"')

    creds = f"--src-creds={token_registry.username}:{token_registry.password}"
    source = f"{token_registry.host}/private/token-app:v1"
    assert_dir_matches(copy_to_dir(skopeo, source, tmp_path / "authorised", creds), image)
    with pytest.raises(SkopeoError, match=r"(?i)unauthorized|denied"):
        copy_to_dir(skopeo, source, tmp_path / "anonymous")
    refused = token_registry.token_server.refused
    with pytest.raises(SkopeoError):
        copy_to_dir(skopeo, source, tmp_path / "wrong", f"--src-creds={token_registry.username}:wrong")
    assert token_registry.token_server.refused > refused


def test_token_registry_lets_anonymous_clients_pull_public_repositories_only(
    token_registry, images, skopeo, tmp_path
):
    image = images.synthetic(layers=1, layer_size=100_000, seed=41)
    push(token_registry, "public/tools", "v1", image)

    copied = copy_to_dir(skopeo, f"{token_registry.host}/public/tools:v1", tmp_path / "anonymous")
    assert_dir_matches(copied, image)
    anonymous_pusher = type("Anonymous", (), {"url": token_registry.url})()
    with pytest.raises(image_types.PushError, match="401"):
        push(anonymous_pusher, "public/tools", "v2", image)


def test_token_server_answers_as_the_token_spec_says(token_registry):
    server = token_registry.token_server
    credentials = (token_registry.username, token_registry.password)
    response = requests.get(
        server.realm,
        params=[("service", server.service), ("scope", "repository:a/b:pull,push repository:c:pull")],
        auth=credentials,
        timeout=10,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] >= 60
    assert body["issued_at"].endswith("Z")
    claims = tokenserver.token_claims(body["token"])
    assert claims["iss"] == server.issuer
    assert claims["aud"] == server.service
    assert claims["sub"] == token_registry.username
    assert claims["nbf"] <= time.time() < claims["exp"]
    assert claims["access"] == [
        {"type": "repository", "name": "a/b", "actions": ["pull", "push"]},
        {"type": "repository", "name": "c", "actions": ["pull"]},
    ]
    # The x5c leaf is signed by the CA the registry trusts.
    leaf = tokenserver.leaf_certificate(body["token"])
    leaf.verify_directly_issued_by(server.signer.ca.certificate)

    def anonymous_actions(scope: str) -> list[str]:
        return tokenserver.token_claims(_token(token_registry, scope))["access"][0]["actions"]

    assert anonymous_actions("repository:public/x:pull,push") == ["pull"]
    assert anonymous_actions("repository:private/x:pull") == []
    wrong_password = (token_registry.username, "nope")
    wrong = requests.get(server.realm, params={"service": server.service}, auth=wrong_password, timeout=10)
    assert wrong.status_code == 401
    other_service = requests.get(server.realm, params={"service": "elsewhere"}, timeout=10)
    assert other_service.status_code == 400


def test_token_registry_checks_signature_issuer_audience_expiry_and_access(token_registry, images):
    image = images.synthetic(layers=1, layer_size=50_000, seed=42)
    push(token_registry, "private/verify", "v1", image)
    server = token_registry.token_server
    path = "/v2/private/verify/manifests/v1"
    credentials = (token_registry.username, token_registry.password)
    issued = _token(token_registry, "repository:private/verify:pull", credentials)
    assert _bearer_get(token_registry, path, issued).status_code == 200

    now = int(time.time())
    good = {
        "iss": server.issuer,
        "sub": "someone",
        "aud": server.service,
        "exp": now + 300,
        "nbf": now - 1,
        "iat": now,
        "jti": "t",
        "access": [{"type": "repository", "name": "private/verify", "actions": ["pull"]}],
    }
    assert _bearer_get(token_registry, path, server.signer.sign(good)).status_code == 200
    refused = {
        "untrusted signer": tokenserver.TokenSigner().sign(good),
        "wrong issuer": server.signer.sign({**good, "iss": "someone-else"}),
        "wrong audience": server.signer.sign({**good, "aud": "another-registry"}),
        "expired": server.signer.sign({**good, "exp": now - 120}),
        "other repository": server.signer.sign(
            {**good, "access": [{"type": "repository", "name": "private/other", "actions": ["pull"]}]}
        ),
        "tampered claims": _with_claims(server.signer.sign(good), {**good, "sub": "admin", "jti": "u"}),
        "anonymous token": _token(token_registry, "repository:private/verify:pull"),
    }
    for what, token in refused.items():
        assert _bearer_get(token_registry, path, token).status_code == 401, what


def test_token_registry_restarts_with_its_token_server(registry_factory, images, skopeo):
    started = registry_factory(token=True)
    image = images.synthetic(layers=1, layer_size=50_000, seed=43)
    push(started, "private/restart", "v1", image)
    realm = started.token_server.realm
    started.stop()
    assert not started.token_server.running
    started.start()
    assert started.token_server.realm == realm
    raw = skopeo(
        "inspect",
        "--raw",
        "--tls-verify=false",
        f"--creds={started.username}:{started.password}",
        f"docker://{started.host}/private/restart:v1",
    )
    assert raw.stdout.encode() == image.manifest


def test_token_and_basic_auth_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="choose one"):
        start_registry(tmp_path / "both", auth=True, token=True)
