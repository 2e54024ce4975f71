//! hoist-proto (being written)
