//! Test harness: registries, token issuer, image builder, imagefs runner.
