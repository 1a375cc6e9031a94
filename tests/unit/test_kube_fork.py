"""A kubeconfig loaded before a fork stays usable after a forked child exits (gunicorn workers are
forked from the master, where the node agent's client lives)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import yaml

from imagewarm.kube import Kube


def test_a_forked_childs_exit_leaves_the_parents_kubeconfig_files(tmp_path: Path) -> None:
    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": "https://127.0.0.1:1",
                            "certificate-authority-data": ca.decode(),
                        },
                    }
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    kube = Kube.from_kubeconfig(kubeconfig)
    assert isinstance(kube.verify, str) and Path(kube.verify).exists()
    child = os.fork()
    if child == 0:  # exits the way a gunicorn worker does: through the interpreter, atexit included
        import atexit

        atexit._run_exitfuncs()
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert Path(kube.verify).exists(), "the child's exit deleted the parent's CA file"
