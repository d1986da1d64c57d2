"""The `lazysnap index` command line: `build`, `sign` and `show`.

    index build IMAGE [--platform os/arch[/variant]]... [--all-platforms] [--plain-http]
                      [--hosts-dir DIR] [--span-size N] [--file-cut-min N] [--min-layer-size N]
                      [--cache-repo REPO]... [--no-shared-cache] [--jobs N] [--sign-key FILE]
                      [--no-static-profile] [--profile CMD [--profile-timeout SECONDS]]
    index sign IMAGE --sign-key FILE [--platform ...]... [--all-platforms] [--plain-http]
                     [--hosts-dir DIR]
    index show IMAGE [--platform ...]... [--all-platforms] [--plain-http] [--hosts-dir DIR]
                     [--json] [--key PUB]...

--sign-key defaults to $LAZYSNAP_SIGN_KEY (a CI job sets it once for every build).

Exit status: 0 done, 1 the build/show failed (message on stderr names image, layer or
registry), 2 bad arguments. Registry credentials come from the docker config.json
($DOCKER_CONFIG or ~/.docker).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snapshotter.indexer.build import BuildReport
    from snapshotter.remote.access import RegistryAccess
    from snapshotter.remote.client import RegistryClient
    from snapshotter.remote.manifest import Platform
    from snapshotter.remote.reference import Reference
    from snapshotter.trust.keys import SigningKey

from snapshotter.cli_types import (
    add_file_cut_argument,
    add_min_layer_size_argument,
    add_span_size_argument,
    at_least_one,
)

_REPO = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--profile-timeout must be > 0, got {text!r}")
    return value


def _cache_repo(text: str) -> str:
    if not _REPO.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid --cache-repo {text!r}: lowercase path components "
            "([a-z0-9] joined by . _ __ -) separated by '/', no registry host"
        )
    return text


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="image reference, e.g. reg:5000/team/app:1")
    parser.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="OS/ARCH[/VARIANT]",
        help="platform of a multi-platform image (repeatable; default: this machine's)",
    )
    parser.add_argument(
        "--all-platforms",
        action="store_true",
        help="every platform of the index (absent children of a sparse index are skipped)",
    )
    parser.add_argument(
        "--plain-http", action="store_true", help="talk plain http to the image's registry"
    )
    parser.add_argument(
        "--hosts-dir",
        metavar="DIR",
        help="containerd-style hosts directory (DIR/<host>/hosts.toml)",
    )


SIGN_KEY_ENV = "LAZYSNAP_SIGN_KEY"


def add_sign_key_argument(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """--sign-key FILE, defaulting to $LAZYSNAP_SIGN_KEY (also used by `accel serve`)."""
    default = os.environ.get(SIGN_KEY_ENV) or None
    parser.add_argument(
        "--sign-key",
        metavar="FILE",
        default=default,
        required=required and default is None,
        help="PEM ECDSA P-256 private key (`lazysnap trust keygen`) to sign every index "
        "artifact pushed (cosign format: nodes with `[trust] public_keys` use only signed "
        f"indexes; docs/trust.md); default ${SIGN_KEY_ENV}"
        + (f" (now {default})" if default else ""),
    )


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """--cache-repo (repeatable) and --no-shared-cache (also used by `accel serve`)."""
    parser.add_argument(
        "--cache-repo",
        type=_cache_repo,
        action="append",
        default=[],
        metavar="REPO",
        help="another repository (same registry) of the per-layer index cache, looked up after "
        "<first path component of IMAGE's repository>/lazysnap-index-cache and before the "
        "registry-wide lazysnap-index-cache; new indexes are stored in each one we may push "
        "to (repeatable; docs/index-cache.md)",
    )
    parser.add_argument(
        "--no-shared-cache",
        dest="shared_cache",
        action="store_false",
        help="neither look up nor store indexes in the registry-wide lazysnap-index-cache "
        "(an index lists the layer's file names: keep a private image's out of a repository "
        "others may read)",
    )


def add_static_profile_argument(parser: argparse.ArgumentParser) -> None:
    """--no-static-profile (also used by `accel serve` and `accel convert`)."""
    parser.add_argument(
        "--no-static-profile",
        dest="static_profile",
        action="store_false",
        help="do not attach the static start-up profile (the entrypoint, its ELF loader and "
        "libraries, the /etc files libc reads, a python's start-up modules: found without "
        "running anything and prefetched by mounts of an image with no recorded --profile; "
        "docs/startup-profile.md)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `build`, `sign` and `show` sub-subcommands to the `index` command's parser."""
    sub = parser.add_subparsers(dest="index_command", metavar="{build,sign,show}", required=True)
    build = sub.add_parser(
        "build",
        help="index an image's layers and push the index as an OCI referrer",
        description="Index every layer of IMAGE of at least --min-layer-size (reusing indexes "
        "other images already built for the same layer), then push one artifact per platform "
        "manifest. Nothing is pushed if any layer fails.",
    )
    _add_common(build)
    add_span_size_argument(build)
    add_file_cut_argument(build)
    add_min_layer_size_argument(build)
    add_cache_arguments(build)
    build.add_argument(
        "--jobs",
        type=at_least_one("--jobs"),
        default=os.cpu_count() or 1,
        metavar="N",
        help="layers indexed in parallel (default: CPU count)",
    )
    add_sign_key_argument(build)
    add_static_profile_argument(build)
    build.add_argument(
        "--profile",
        metavar="CMD",
        help="after indexing, run CMD (split like a shell command line) in the image over lazy "
        "mounts of its layers, record the order in which it first reads files, and attach that "
        "startup profile to the index: snapshotters then fetch those files right after "
        "mounting (needs root; docs/startup-profile.md)",
    )
    build.add_argument(
        "--profile-timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="stop CMD after this long and keep what it read so far (default 60; a server "
        "never exits on its own)",
    )
    build.add_argument(
        "--no-pack",
        dest="pack",
        action="store_false",
        help="with --profile: attach the profile without its start-up pack (the bytes CMD read, "
        "compressed into one blob that mounts fetch in one request; docs/startup-profile.md)",
    )
    build.add_argument(
        "--pack-level",
        type=int,
        choices=range(1, 23),
        metavar="1..22",
        help="zstd level of the start-up pack (default: snapshotter/index/pack.py's, 19)",
    )
    sign = sub.add_parser(
        "sign",
        help="sign the index artifacts IMAGE already has (cosign signature, OCI referrer)",
        description="Sign the newest lazysnap index artifact of each platform manifest of IMAGE "
        "with --sign-key, unless that key signed it already. This vouches for the artifact the "
        "registry holds now, whoever pushed it; `index build --sign-key` re-derives the index "
        "from the layers instead.",
    )
    _add_common(sign)
    add_sign_key_argument(sign, required=True)
    show = sub.add_parser(
        "show",
        help="show which layers of an image are indexed",
        description="Find IMAGE's lazysnap index (referrers API or tag fallback) and list each "
        "layer with its index: span count, entries, index blob size; then the artifact's "
        "start-up profile and the start-up pack it names (each layer's section: offset, size, "
        "uncompressed bytes, chunks).",
    )
    _add_common(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="PUB",
        help="public key (file or directory of *.pub) a node trusts: also say whether such a "
        "node would use the artifact, and why not (repeatable; docs/trust.md)",
    )


def run(args: argparse.Namespace) -> int:
    # Imported here so `lazysnap --help` and other subcommands stay fast.
    from snapshotter.indexer.build import BuildOptions, IndexBuildError, build_image_index
    from snapshotter.indexer.show import show_image_index
    from snapshotter.remote.access import RegistryAccess
    from snapshotter.remote.errors import RegistryError
    from snapshotter.remote.manifest import Platform
    from snapshotter.remote.reference import Reference
    from snapshotter.vocabulary.artifact import ArtifactError

    try:
        platforms = tuple(Platform.parse(p) for p in args.platform)
        ref = Reference.parse(args.image)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.hosts_dir is not None and not os.path.isdir(args.hosts_dir):
        print(f"error: --hosts-dir {args.hosts_dir}: not a directory", file=sys.stderr)
        return 2
    profile_argv = _profile_argv(args)
    if isinstance(profile_argv, str):
        print(f"error: {profile_argv}", file=sys.stderr)
        return 2
    from snapshotter.trust.keys import TrustKeyError, load_signing_key

    sign_key: SigningKey | None = None
    try:
        path = getattr(args, "sign_key", None)
        sign_key = load_signing_key(path) if path else None
    except TrustKeyError as exc:
        print(f"error: --sign-key: {exc}", file=sys.stderr)
        return 2
    try:
        access = RegistryAccess.create(
            hosts_dir=args.hosts_dir, plain_http=(ref.registry,) if args.plain_http else ()
        )
        with access.client() as client:
            if args.index_command == "build":
                options = BuildOptions(
                    platforms=platforms,
                    all_platforms=args.all_platforms,
                    span_size=args.span_size,
                    file_cut_min=args.file_cut_min,
                    min_layer_size=args.min_layer_size,
                    cache_repos=tuple(args.cache_repo),
                    shared_cache=args.shared_cache,
                    jobs=args.jobs,
                    sign_key=sign_key,
                    static_profile=args.static_profile,
                )
                report = build_image_index(client, args.image, options)
                for target in report.targets:
                    if target.artifact_digest is None:
                        state = "no layer large enough to index: nothing attached"
                    elif target.pushed:
                        state = f"pushed {target.artifact_digest} ({target.source})"
                    else:
                        state = f"already indexed by {target.artifact_digest} ({target.source})"
                    if target.signature_digest:
                        state += f", signed by key {_key_id(sign_key)} ({target.signature_digest})"
                    elif sign_key is not None and target.artifact_digest is not None:
                        state += f", already signed by key {_key_id(sign_key)}"
                    if target.static_profile:
                        state += f", {target.static_profile}"
                    print(f"{target.target.platform} {target.target.subject.digest}: {state}")
                print(report.summary())
                if cache := report.cache_summary():
                    print(cache)
                if profile_argv:
                    return _record_profiles(
                        client, access, ref, report, args, profile_argv, sign_key
                    )
                return 0
            if args.index_command == "sign":
                assert sign_key is not None  # required argument
                return _sign(client, args, platforms, sign_key)
            trust = None
            if args.key:
                from snapshotter.trust.keys import load_public_keys
                from snapshotter.trust.policy import TrustMode, TrustPolicy

                trust = TrustPolicy(TrustMode.SIGNED, load_public_keys(args.key))
            view = show_image_index(
                client, args.image, platforms, all_platforms=args.all_platforms, trust=trust
            )
            if args.json:
                print(json.dumps(view.to_json(), indent=2))
            else:
                print(view.render())
            return 0
    except (IndexBuildError, RegistryError, ArtifactError) as exc:
        message = str(exc)
        if not message.startswith((args.image, str(ref))):  # each error names the image once
            message = f"{args.image}: {message}"
        print(f"error: {message}", file=sys.stderr)
        return 1
    except TrustKeyError as exc:
        print(f"error: --key: {exc}", file=sys.stderr)
        return 2


def _key_id(key: SigningKey | None) -> str:
    return key.public.key_id if key is not None else "-"


def _sign(
    client: RegistryClient,
    args: argparse.Namespace,
    platforms: tuple[Platform, ...],
    key: SigningKey,
) -> int:
    from snapshotter.indexer.build import BuildOptions
    from snapshotter.indexer.sign_existing import sign_image_indexes

    options = BuildOptions(platforms=platforms, all_platforms=args.all_platforms)
    unindexed = 0
    for target in sign_image_indexes(client, args.image, key, options):
        if target.artifact_digest is None:
            unindexed += 1
            state = "no lazysnap index: nothing to sign"
        elif target.signature_digest is None:
            state = f"{target.artifact_digest} already signed by key {key.public.key_id}"
        else:
            state = (
                f"{target.artifact_digest} signed by key {key.public.key_id} "
                f"({target.signature_digest})"
            )
        print(f"{target.platform} {target.subject_digest}: {state}")
    return 1 if unindexed else 0


def _profile_argv(args: argparse.Namespace) -> list[str] | str | None:
    """--profile split into argv; a str is the reason it cannot be used."""
    import shlex

    text = getattr(args, "profile", None)
    if text is None:
        return None
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        return f"--profile {text!r}: {exc}"
    if not argv:
        return "--profile: empty command"
    if os.geteuid() != 0:
        return "--profile needs root: it mounts the image's layers and runs CMD in a chroot"
    return argv


def _record_profiles(
    client: RegistryClient,
    access: RegistryAccess,
    ref: Reference,
    report: BuildReport,
    args: argparse.Namespace,
    argv: list[str],
    sign_key: SigningKey | None,
) -> int:
    """Record and attach the profile of the platform manifest this machine can run (the new
    artifact signed with sign_key when given)."""
    from snapshotter.index.pack import DEFAULT_LEVEL
    from snapshotter.indexer.signing import KeySigner
    from snapshotter.profile.attach import PackSettings, profile_summary, record_and_attach
    from snapshotter.profile.record import ProfileRecordError
    from snapshotter.remote.errors import RegistryError
    from snapshotter.remote.manifest import Platform

    host = Platform.host()
    runnable = [
        t
        for t in report.targets
        if t.artifact_digest is not None
        and (
            t.target.platform == "-"
            or host.match_rank(Platform.parse(t.target.platform)) is not None
        )
    ]
    if not runnable:
        print(
            f"error: {args.image}: no indexed platform manifest this machine ({host}) can run: "
            "no profile recorded",
            file=sys.stderr,
        )
        return 1
    target = runnable[0].target
    try:
        attached = record_and_attach(
            client,
            ref,
            target.subject.digest,
            argv,
            command_text=args.profile,
            timeout=args.profile_timeout,
            access=access,
            signer=KeySigner(client, sign_key) if sign_key is not None else None,
            pack=PackSettings(args.pack, args.pack_level or DEFAULT_LEVEL),
        )
    except (ProfileRecordError, RegistryError) as exc:
        print(f"error: {args.image}: profile: {exc}", file=sys.stderr)
        return 1
    ended = "stopped by --profile-timeout" if attached.recording.exit_status is None else "exited 0"
    pack = attached.pack
    packed = (
        f", pack {pack.digest} ({pack.size} bytes of {pack.uncompressed_size} read, "
        f"{pack.seconds:.1f}s)"
        if pack is not None
        else ""
    )
    print(
        f"{target.platform} {target.subject.digest}: profile {attached.profile_digest} "
        f"({profile_summary(attached.recording.profile)}; command {ended}){packed} "
        f"pushed in {attached.artifact_digest} ({attached.source})"
    )
    return 0
