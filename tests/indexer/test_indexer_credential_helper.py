"""`lazysnap index build` whose only credentials for peryx come from a docker credential
helper: the real `docker-credential-pass`, named by `credsStore` in the CLI's docker config."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from indexer_helpers import CliResult, Target, build_image, push_image, random_layer, unique

from harness.credential_pass import pass_store
from harness.peryx import Peryx
from harness.procs import HarnessError
from snapshotter.remote.credentials import Credentials

pytestmark = pytest.mark.stack


@pytest.fixture
def helper_config(peryx: Peryx, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """DOCKER_CONFIG holds `{"credsStore": "pass"}` only; pass holds peryx's credentials."""
    directory = Path(tempfile.mkdtemp(prefix="lzs-dockercfg-"))
    (directory / "config.json").write_text(json.dumps({"credsStore": "pass"}))
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    try:
        with pass_store() as passwords:
            for name, value in passwords.env.items():
                monkeypatch.setenv(name, value)
            passwords.store(peryx.host, "lazysnap", peryx.token)
            yield
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_index_build_authenticates_through_docker_credential_pass(
    helper_config: None,
    peryx: Peryx,
    lazysnap_index: Callable[..., CliResult],
    workdir: Path,
) -> None:
    target = Target(peryx.host, peryx.route, Credentials("lazysnap", peryx.token))
    image = build_image(workdir, "v1", [random_layer("app", 400 << 10)])
    repo = f"{target.namespace}/{unique('helper')}"
    with target.client() as client:
        push_image(client, image, target.host, repo, "v1")
    flags = ("--plain-http", "--min-layer-size", "65536", "--span-size", "65536")
    built = lazysnap_index("build", f"{target.host}/{repo}:v1", *flags)
    assert built.code == 0, built.err
    assert "1 layer indexed" in built.out
    assert peryx.token not in built.out + built.err
