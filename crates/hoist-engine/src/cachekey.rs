//! Cache keys, BuildKit-style: a key identifies the work of one op, not a position in a
//! linear chain, so a hit after a miss still hits.
//!
//! key = sha256(namespace, platform, canonical op definition, parent key, input keys).
//! The op definition is the graph's serde form, which leaves out what carries no meaning
//! (display text, line numbers, undeclared proxy variables). Inputs are the content digest
//! of COPY/ADD sources, the keys of stages that are read, and digests of fetched URLs. Base
//! images key on ChainID(diff_ids), so the same layers under another tag still hit.

use hoist_oci::digest::{chain_id, Digest};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::graph::{Op, Platform};

/// A cache key (64 hex digits).
pub type CacheKey = String;

/// Key of a stage's base: `scratch`, or the image's layers.
pub fn base_key(namespace: &str, platform: &Platform, diff_ids: &[Digest]) -> CacheKey {
    let base = chain_id(diff_ids).map(|d| d.to_string()).unwrap_or_else(|| "scratch".to_string());
    hash(&KeyInput { v: 1, namespace, platform, op: &"base", parent: None, inputs: &[("chain", base)] })
}

/// Key of a step.
///
/// `parent` is `None` only for ops whose result does not depend on the filesystem below
/// them (`COPY --link`).
pub fn step_key(namespace: &str, platform: &Platform, parent: Option<&str>, op: &Op, inputs: &[(&str, String)]) -> CacheKey {
    hash(&KeyInput { v: 1, namespace, platform, op, parent, inputs })
}

#[derive(Serialize)]
struct KeyInput<'a, O: Serialize> {
    v: u32,
    namespace: &'a str,
    platform: &'a Platform,
    op: &'a O,
    parent: Option<&'a str>,
    inputs: &'a [(&'a str, String)],
}

fn hash<O: Serialize>(input: &KeyInput<'_, O>) -> CacheKey {
    // Serialization of these plain structs cannot fail; fall back to Debug-free empty
    // bytes would silently collide, so treat failure as a bug.
    let bytes = serde_json::to_vec(input).expect("cache key input serializes");
    hex::encode(Sha256::digest(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{MkdirOp, NetworkMode, RunOp, SecurityMode};

    fn run(cmd: &str, proxy: &[&str]) -> Op {
        Op::Run(RunOp {
            args: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
            env: vec!["PATH=/bin".into()],
            proxy_env: proxy.iter().map(|s| s.to_string()).collect(),
            cwd: "/".into(),
            user: String::new(),
            network: NetworkMode::Default,
            security: SecurityMode::Sandbox,
            mounts: vec![],
            inline_files: vec![],
        })
    }

    #[test]
    fn keys_depend_on_op_parent_platform_namespace_and_inputs() {
        let p = Platform::parse("linux/amd64").unwrap();
        let arm = Platform::parse("linux/arm64").unwrap();
        let k = step_key("proj", &p, Some("parent"), &run("make", &[]), &[]);
        assert_eq!(k, step_key("proj", &p, Some("parent"), &run("make", &[]), &[]));
        assert_ne!(k, step_key("proj", &p, Some("parent"), &run("make all", &[]), &[]));
        assert_ne!(k, step_key("proj", &p, Some("other"), &run("make", &[]), &[]));
        assert_ne!(k, step_key("proj", &arm, Some("parent"), &run("make", &[]), &[]));
        assert_ne!(k, step_key("other", &p, Some("parent"), &run("make", &[]), &[]));
        assert_ne!(k, step_key("proj", &p, Some("parent"), &run("make", &[]), &[("src", "x".into())]));
    }

    #[test]
    fn undeclared_proxy_variables_are_not_part_of_the_key() {
        let p = Platform::parse("linux/amd64").unwrap();
        assert_eq!(
            step_key("n", &p, Some("a"), &run("make", &[]), &[]),
            step_key("n", &p, Some("a"), &run("make", &["HTTP_PROXY=http://proxy:3128"]), &[])
        );
    }

    #[test]
    fn base_keys_follow_the_layers_not_the_name() {
        let p = Platform::parse("linux/amd64").unwrap();
        let l = [Digest::of(b"1"), Digest::of(b"2")];
        assert_eq!(base_key("n", &p, &l), base_key("n", &p, &l.clone()));
        assert_ne!(base_key("n", &p, &l), base_key("n", &p, &l[..1]));
        assert_ne!(base_key("n", &p, &[]), base_key("n", &p, &l[..1]));
        let mk = Op::Mkdir(MkdirOp { path: "/app".into(), user: String::new() });
        assert_ne!(step_key("n", &p, Some("x"), &mk, &[]), step_key("n", &p, None, &mk, &[]));
    }
}
