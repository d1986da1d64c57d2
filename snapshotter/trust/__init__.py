"""Which lazysnap indexes a node may build lazy snapshots from: cosign-compatible signatures
over index artifact manifests (simple signing payload, ECDSA P-256), keys, and the policy
decision. No I/O beyond reading key files: the registry lookups live in remote/signatures.py."""
