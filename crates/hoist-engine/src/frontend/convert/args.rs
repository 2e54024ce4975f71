//! Build arguments: the predefined platform args, the global (meta) ARGs before the first
//! FROM, ARG inside a stage (defaults, build-arg overrides, the global value), and the
//! warning for build-args no ARG consumed.

use hoist_dockerfile::instructions::{ArgDef, Instr, Instruction};

use super::{Converter, State, PROXY_ARGS, R};

/// ARGs BuildKit keeps out of the RUN environment.
const NON_ENV_ARGS: [&str; 2] = ["BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"];

fn is_platform_arg(k: &str) -> bool {
    matches!(
        k,
        "BUILDPLATFORM"
            | "BUILDOS"
            | "BUILDOSVERSION"
            | "BUILDARCH"
            | "BUILDVARIANT"
            | "TARGETPLATFORM"
            | "TARGETOS"
            | "TARGETOSVERSION"
            | "TARGETARCH"
            | "TARGETVARIANT"
            | "TARGETSTAGE"
    )
}

impl Converter<'_> {
    /// The predefined args (build and target platform, target stage) in the global scope,
    /// each overridable by a build-arg.
    pub(super) fn init_global_args(&mut self, target_name: &str) {
        let bp = self.build_platform.clone();
        let tp = self.target_platform.clone();
        let pairs = [
            ("BUILDPLATFORM", bp.to_string()),
            ("BUILDOS", bp.os.clone()),
            ("BUILDOSVERSION", String::new()),
            ("BUILDARCH", bp.architecture.clone()),
            ("BUILDVARIANT", bp.variant_arg()),
            ("TARGETPLATFORM", tp.to_string()),
            ("TARGETOS", tp.os.clone()),
            ("TARGETOSVERSION", String::new()),
            ("TARGETARCH", tp.architecture.clone()),
            ("TARGETVARIANT", tp.variant_arg()),
            ("TARGETSTAGE", target_name.to_string()),
        ];
        for (k, v) in pairs {
            let v = self.opts.build_args.get(k).cloned().unwrap_or(v);
            self.global.set(k, &v);
        }
    }

    /// The ARGs before the first FROM: a build-arg, else the default expanded with the
    /// global args so far.
    pub(super) fn declare_meta_args(&mut self, meta_args: &[Instr]) -> R<()> {
        for meta in meta_args {
            let Instruction::Arg(defs) = &meta.instruction else {
                continue;
            };
            for def in defs {
                self.declared_args.insert(def.key.clone());
                let value = match self.opts.build_args.get(&def.key) {
                    Some(v) => Some(v.clone()),
                    None => match &def.default {
                        Some(d) => Some(self.expand(d, &self.global, meta.start_line)?),
                        None => None,
                    },
                };
                if let Some(v) = value {
                    self.global.set(&def.key, &v);
                }
            }
        }
        Ok(())
    }

    /// ARG in a stage: a build-arg wins, then the default (expanded), then the global value
    /// of an ARG declared without a default.
    pub(super) fn dispatch_arg(&mut self, st: &mut State, line: usize, defs: &[ArgDef]) -> R<()> {
        let mut parts = Vec::new();
        for def in defs {
            self.declared_args.insert(def.key.clone());
            let has_value = self.opts.build_args.contains_key(&def.key);
            let mut value = def.default.clone();
            let mut has_default = value.is_some();
            if !has_default && !has_value {
                if let Some(v) = self.global.get(&def.key) {
                    value = Some(v.to_string());
                    has_default = false;
                }
            }
            if has_value {
                value = self.opts.build_args.get(&def.key).cloned();
            } else if has_default {
                if let Some(d) = &value {
                    value = Some(self.expand(d, &st.env, line)?);
                }
            }
            if let Some(v) = &value {
                if !NON_ENV_ARGS.contains(&def.key.as_str()) {
                    st.env.set(&def.key, v);
                }
            }
            st.build_args.push((def.key.clone(), value.clone()));
            parts.push(match &value {
                Some(v) => format!("{}={v}", def.key),
                None => def.key.clone(),
            });
        }
        self.check_env_size(st, line)?;
        let msg = format!("ARG {}", parts.join(" "));
        self.charge(line, msg.len())?;
        self.history(st, msg, false, false);
        Ok(())
    }

    /// Warn of build-args no ARG declared (the proxy and platform args, and
    /// `SOURCE_DATE_EPOCH`, are consumed without one).
    pub(super) fn warn_unused_build_args(&mut self) {
        let unused: Vec<String> = self
            .opts
            .build_args
            .keys()
            .filter(|k| {
                !self.declared_args.contains(*k)
                    && !PROXY_ARGS.iter().any(|p| p.eq_ignore_ascii_case(k))
                    && !is_platform_arg(k)
                    // the exporter consumes it (layer and config timestamps)
                    && k.as_str() != "SOURCE_DATE_EPOCH"
            })
            .cloned()
            .collect();
        if !unused.is_empty() {
            self.warnings.push(format!("one or more build-args [{}] were not consumed", unused.join(" ")));
        }
    }
}
