//! Entitlements: what a step may do beyond the sandbox, as BuildKit names them. A step that
//! needs one runs only when the client asked for it (`hoist build --allow`) and the builder
//! grants it (`hoist serve --allow-entitlement`, `hoist project allow`); otherwise the build
//! fails before any step runs, naming the line and what to grant.

use std::collections::BTreeSet;
use std::fmt;

use crate::graph::{BuildGraph, NetworkMode, Op, SecurityMode};

/// One entitlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entitlement {
    /// `RUN --network=host` / `--network=host`: the builder's own network.
    NetworkHost,
    /// `RUN --security=insecure`: every capability, no seccomp, no masked paths.
    SecurityInsecure,
}

/// A name that is not an entitlement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown entitlement {0:?}: expected network.host or security.insecure")]
pub struct UnknownEntitlement(pub String);

/// Why an entitlement may not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The builder does not grant it to the project.
    #[error(
        "the {entitlement} entitlement is not granted to project {project:?} on this builder (its operator can grant it with \
         `hoist serve --allow-entitlement {entitlement}` or `hoist project allow {project} {entitlement}`)"
    )]
    NotGranted {
        /// The entitlement.
        entitlement: Entitlement,
        /// The build's project ([`Entitlements::project`]).
        project: String,
    },
    /// The client did not ask for it.
    #[error("the {0} entitlement was not requested: pass --allow {0} to hoist build")]
    NotRequested(Entitlement),
}

/// A build that needs an entitlement it may not use, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntitlementError {
    /// The build-wide `--network=host`.
    #[error("--network=host: {0}")]
    BuildNetwork(#[source] Denied),
    /// A step (`Dockerfile:7: RUN --security=insecure: ...`).
    #[error("{file}:{line}: {what}: {source}")]
    Step {
        /// The Dockerfile's name, e.g. `Dockerfile`.
        file: String,
        /// The step's line (1-based).
        line: usize,
        /// The flag that needs the entitlement, e.g. `RUN --network=host`.
        what: &'static str,
        /// Why it may not be used.
        source: Denied,
    },
}

impl Entitlement {
    /// Every entitlement.
    pub const ALL: [Entitlement; 2] = [Entitlement::NetworkHost, Entitlement::SecurityInsecure];

    /// BuildKit's name (`network.host`, `security.insecure`).
    pub fn name(self) -> &'static str {
        match self {
            Entitlement::NetworkHost => "network.host",
            Entitlement::SecurityInsecure => "security.insecure",
        }
    }

    /// Parse BuildKit's name.
    pub fn parse(s: &str) -> Result<Entitlement, UnknownEntitlement> {
        Entitlement::ALL.into_iter().find(|e| e.name() == s.trim()).ok_or_else(|| UnknownEntitlement(s.to_string()))
    }

    /// Parse a list of names (comma-separated items allowed).
    pub fn parse_list<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<BTreeSet<Entitlement>, UnknownEntitlement> {
        items.into_iter().flat_map(|s| s.split(',')).filter(|s| !s.trim().is_empty()).map(Entitlement::parse).collect()
    }
}

impl fmt::Display for Entitlement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The entitlements of one build: what the client asked for and what the builder grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entitlements {
    /// Asked for by the client (`--allow`; `--network=host` asks for network.host).
    pub requested: BTreeSet<Entitlement>,
    /// Granted by the builder to the build's project.
    pub granted: BTreeSet<Entitlement>,
    /// The project, named in errors.
    pub project: String,
}

impl Entitlements {
    /// Every entitlement asked for and granted (the embedded builder's own user).
    pub fn all(project: &str) -> Entitlements {
        Entitlements { requested: Entitlement::ALL.into(), granted: Entitlement::ALL.into(), project: project.to_string() }
    }

    /// Whether `e` may be used; otherwise what is missing and how to get it.
    pub fn check(&self, e: Entitlement) -> Result<(), Denied> {
        if !self.granted.contains(&e) {
            return Err(Denied::NotGranted { entitlement: e, project: self.project.clone() });
        }
        if !self.requested.contains(&e) {
            return Err(Denied::NotRequested(e));
        }
        Ok(())
    }

    /// Check a build before it runs: the build-wide network and every RUN of `graph`.
    /// The error names the Dockerfile line (`Dockerfile:7: RUN --security=insecure: ...`).
    pub fn check_graph(&self, graph: &BuildGraph, network: NetworkMode, dockerfile_name: &str) -> Result<(), EntitlementError> {
        if network == NetworkMode::Host {
            self.check(Entitlement::NetworkHost).map_err(EntitlementError::BuildNetwork)?;
        }
        for stage in &graph.stages {
            for step in &stage.steps {
                let Op::Run(run) = &step.op else { continue };
                let needs = [
                    (run.network == NetworkMode::Host, Entitlement::NetworkHost, "RUN --network=host"),
                    (run.security == SecurityMode::Insecure, Entitlement::SecurityInsecure, "RUN --security=insecure"),
                ];
                for (needed, e, what) in needs {
                    if needed {
                        self.check(e).map_err(|source| EntitlementError::Step {
                            file: dockerfile_name.to_string(),
                            line: step.line,
                            what,
                            source,
                        })?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::FrontendOptions;

    struct NoImages;

    #[async_trait::async_trait]
    impl crate::frontend::ImageResolver for NoImages {
        async fn resolve(
            &self,
            reference: &str,
            _: &crate::graph::Platform,
        ) -> Result<crate::graph::ResolvedImage, crate::images::ImageError> {
            unreachable!("the tests' Dockerfiles use FROM scratch, not {reference}")
        }
    }

    fn graph(dockerfile: &str) -> BuildGraph {
        let opts = FrontendOptions { dockerfile_name: "Dockerfile".into(), ..Default::default() };
        futures::executor::block_on(crate::frontend::build_graph(dockerfile.as_bytes(), &opts, &NoImages)).unwrap()
    }

    fn ents(requested: &[Entitlement], granted: &[Entitlement]) -> Entitlements {
        Entitlements { requested: requested.iter().copied().collect(), granted: granted.iter().copied().collect(), project: "web".into() }
    }

    #[test]
    fn names_parse_and_unknown_ones_are_refused() {
        assert_eq!(Entitlement::parse("security.insecure").unwrap(), Entitlement::SecurityInsecure);
        let both = Entitlement::parse_list(["network.host,security.insecure"]).unwrap();
        assert_eq!(both.len(), 2);
        let e = Entitlement::parse_list(["device"]).unwrap_err();
        assert!(e.to_string().contains("\"device\""), "{e}");
    }

    #[test]
    fn a_step_needs_both_the_request_and_the_grant_and_the_error_names_its_line() {
        let g = graph("FROM scratch\nRUN true\nRUN --security=insecure true\n");
        use Entitlement::*;
        assert!(ents(&[], &[]).check_graph(&graph("FROM scratch\nRUN --network=none true\n"), NetworkMode::Default, "Dockerfile").is_ok());
        let e = ents(&[SecurityInsecure], &[]).check_graph(&g, NetworkMode::Default, "Dockerfile").unwrap_err().to_string();
        assert!(
            e.starts_with("Dockerfile:3: RUN --security=insecure: ") && e.contains("hoist serve --allow-entitlement security.insecure"),
            "{e}"
        );
        assert!(e.contains("hoist project allow web security.insecure"), "{e}");
        let e = ents(&[], &[SecurityInsecure]).check_graph(&g, NetworkMode::Default, "Dockerfile").unwrap_err().to_string();
        assert!(e.contains("--allow security.insecure"), "{e}");
        assert!(ents(&[SecurityInsecure], &[SecurityInsecure]).check_graph(&g, NetworkMode::Default, "Dockerfile").is_ok());
        let host = graph("FROM scratch\nRUN --network=host true\n");
        assert!(ents(&[SecurityInsecure], &[SecurityInsecure])
            .check_graph(&host, NetworkMode::Default, "Dockerfile")
            .unwrap_err()
            .to_string()
            .starts_with("Dockerfile:2: RUN --network=host"));
        let e = ents(&[], &[]).check_graph(&graph("FROM scratch\nRUN true\n"), NetworkMode::Host, "Dockerfile").unwrap_err().to_string();
        assert!(e.starts_with("--network=host: "), "{e}");
        assert!(Entitlements::all("x").check_graph(&host, NetworkMode::Host, "Dockerfile").is_ok());
    }
}
