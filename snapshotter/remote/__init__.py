"""The registry: everything lazysnap says over HTTP.

reference.py  Reference.parse / Repository (docker.io defaults, host:port, tag, @digest)
hosts.py      HostsConfig: containerd hosts.toml (mirrors then server, capabilities, TLS,
              headers) and the --plain-http override
auth.py       CredentialStore (docker config.json), Authenticator (Basic, bearer tokens with
              per-scope cache and refresh); never logs a secret
manifest.py   media types, Descriptor, Platform, Manifest (no I/O)
transport.py  TransportPolicy: redirects, auth challenges, retries and timeouts, written once
              for both HTTP libraries below (each implements one hop)
access.py     RegistryAccess: hosts dir, plain-http hosts, docker config, timeouts as one
              frozen value that builds clients and Range readers (JSON for mount specs)
client.py     RegistryClient (httpx): manifests, platform resolution, blobs, uploads
blob.py       BlobReader (urllib3): Range reads for the lazy data path, thread-safe
referrers.py  find_referrers / push_referrer: OCI referrers API, sha256-<hex> tag schema, ORAS
layout.py     push_oci_layout: push an OCI image layout directory (tests, fixtures)
errors.py     RegistryError hierarchy; messages name ref/repo/digest/URL, never credentials
"""
