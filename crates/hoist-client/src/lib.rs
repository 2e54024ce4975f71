//! hoist-client (being written)
