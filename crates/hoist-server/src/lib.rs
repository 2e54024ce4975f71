//! hoist-server (being written)
