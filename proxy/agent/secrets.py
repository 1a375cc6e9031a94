"""Pull-secret credentials of a task: the controller's copies in the release namespace
(`spec.images[name].pullSecrets`), read with the agent's own client and turned into the
`Authorization` header for the image. The credential is held only in memory, for one attempt, and
never logged or written anywhere."""

from __future__ import annotations

from collections.abc import Iterable

from imagewarm import dockerconfig
from imagewarm.errors import ImagewarmError
from imagewarm.kube import Forbidden, Kube, NotFound
from imagewarm.reference import Reference
from proxy.agent.nodeimage import SecretRef


class SecretError(ImagewarmError, RuntimeError):
    """A pull secret could not be used; the message names it and says what to do (no credential)."""


def authorization(kube: Kube, refs: Iterable[SecretRef], image: Reference) -> str | None:
    """The Authorization header for `image` from the secrets `refs` (the first secret with an entry
    for its registry wins), or None when there are none. Raises SecretError."""
    configs = []
    for ref in refs:
        where = f"pull secret {ref.namespace}/{ref.name}"
        try:
            secret = kube.get(f"/api/v1/namespaces/{ref.namespace}/secrets/{ref.name}")
        except NotFound:
            raise SecretError(
                f"{where} not found: the controller copies a job's pullSecrets there; check that the "
                "job's secrets exist in its namespace"
            ) from None
        except Forbidden:
            raise SecretError(
                f"{where}: the node agent may not read it; give its service account `get` on secrets "
                f"in {ref.namespace}"
            ) from None
        try:
            configs.append(dockerconfig.from_secret(secret))
        except dockerconfig.DockerConfigError as exc:
            raise SecretError(f"{where}: {exc}") from None
    return dockerconfig.authorization_for(dockerconfig.merge(*configs), image) if configs else None
