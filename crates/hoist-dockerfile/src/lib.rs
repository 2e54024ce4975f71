//! hoist-dockerfile: (being written)
