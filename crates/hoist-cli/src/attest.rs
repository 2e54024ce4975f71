//! `--provenance`, `--sbom`, `--attest` and `--annotation` as buildx reads them: the
//! attestations a build asks for (the builder makes the provenance; hoist makes no SBOM
//! yet), and notes when an output cannot keep what was asked for.

use anyhow::{anyhow, bail};
use hoist_client::outputs::OutputSpec;
use hoist_client::v1;
use hoist_dockerfile::gocompat::parse_bool;
use v1::output::Kind;

use crate::build::BuildArgs;

/// buildx's switch for the default provenance.
const NO_DEFAULT: &str = "BUILDX_NO_DEFAULT_ATTESTATIONS";

/// One `--attest` (or `--provenance`/`--sbom` made into one, as buildx does).
#[derive(Debug, PartialEq)]
struct Attest {
    kind: String,
    disabled: bool,
    attrs: Vec<(String, String)>,
}

/// `--provenance true` → `type=provenance,disabled=false`; `mode=max` →
/// `type=provenance,mode=max` (buildx's CanonicalizeAttest).
fn canonical(kind: &str, value: &str) -> String {
    match parse_bool(value) {
        Some(b) => format!("type={kind},disabled={}", !b),
        None => format!("type={kind},{value}"),
    }
}

fn parse_attest(s: &str) -> anyhow::Result<Attest> {
    let mut a = Attest { kind: String::new(), disabled: false, attrs: Vec::new() };
    for field in s.split(',').filter(|f| !f.trim().is_empty()) {
        let (k, v) = field.split_once('=').ok_or_else(|| anyhow!("--attest {s:?}: expected key=value, got {field:?}"))?;
        match k.trim().to_ascii_lowercase().as_str() {
            "type" => a.kind = v.to_string(),
            "disabled" => a.disabled = parse_bool(v).ok_or_else(|| anyhow!("--attest {s:?}: invalid disabled={v:?}"))?,
            _ => a.attrs.push((k.trim().to_string(), v.to_string())),
        }
    }
    if a.kind.is_empty() {
        bail!("--attest {s:?}: attestation type not specified (type=provenance or type=sbom)");
    }
    Ok(a)
}

/// The attestations of `args`: the provenance to ask the builder for (`None`: the builder's
/// default, buildx's `mode=min`), and warnings to show.
pub(crate) fn attestations(args: &BuildArgs) -> anyhow::Result<(Option<v1::Provenance>, Vec<String>)> {
    let mut given = args.attest.clone();
    given.extend(args.provenance.iter().filter(|v| !v.is_empty()).map(|v| canonical("provenance", v)));
    given.extend(args.sbom.iter().filter(|v| !v.is_empty()).map(|v| canonical("sbom", v)));
    let mut by_kind: Vec<Attest> = Vec::new();
    for s in &given {
        let a = parse_attest(s)?;
        // As buildx: a later one of a type replaces the earlier.
        match by_kind.iter_mut().find(|b| b.kind == a.kind) {
            Some(b) => *b = a,
            None => by_kind.push(a),
        }
    }
    let mut warnings = Vec::new();
    let mut provenance = None;
    for a in by_kind {
        match a.kind.as_str() {
            "provenance" if a.disabled => provenance = Some(v1::Provenance { disabled: true, ..Default::default() }),
            "provenance" => {
                // An explicit request without a mode is BuildKit's default: max.
                let mut p = v1::Provenance { mode: "max".into(), ..Default::default() };
                for (k, v) in &a.attrs {
                    match k.as_str() {
                        "mode" => p.mode = v.clone(),
                        "builder-id" => p.builder_id = v.clone(),
                        "reproducible" => {
                            p.reproducible =
                                parse_bool(v).ok_or_else(|| anyhow!("--provenance reproducible={v:?}: expected true or false"))?
                        }
                        "version" if v == "v0.2" => {}
                        "version" => warnings.push(format!("--provenance version={v}: hoist writes SLSA provenance v0.2")),
                        "inline-only" | "filename" => {}
                        other => warnings.push(format!("--provenance {other}= is not supported by hoist; it is ignored")),
                    }
                }
                provenance = Some(p);
            }
            "sbom" if a.disabled => {}
            "sbom" => warnings.push("--sbom: hoist does not produce SBOM attestations yet; the build goes on without one".into()),
            other => warnings.push(format!("--attest type={other}: unknown attestation type (hoist knows provenance and sbom); ignored")),
        }
    }
    if provenance.is_none() {
        if let Ok(v) = std::env::var(NO_DEFAULT) {
            if parse_bool(&v).ok_or_else(|| anyhow!("invalid {NO_DEFAULT}={v:?}: expected true or false"))? {
                provenance = Some(v1::Provenance { disabled: true, ..Default::default() });
            }
        }
    }
    Ok((provenance, warnings))
}

/// Whether an output keeps OCI annotations and attestations: a pushed or stored image, an
/// OCI archive. The Docker engine's classic image store, a docker archive, a filesystem and
/// a result saved for `hoist pull` do not.
fn holds_meta(o: &OutputSpec) -> bool {
    matches!(o.kind, Kind::Image(_) | Kind::Oci(_))
}

/// Check `--annotation`s and attestations before anything runs; returns the notes to show:
/// the warnings of [`attestations`], and what an output that cannot keep them drops.
pub(crate) fn notes(args: &BuildArgs, outputs: &[OutputSpec]) -> anyhow::Result<Vec<String>> {
    // The builder checks them too; the client alone (no `builder` feature) leaves it to it.
    #[cfg(feature = "builder")]
    hoist_engine::export::Annotations::parse(&args.annotations)?;
    let (provenance, mut notes) = attestations(args)?;
    let dropping: Vec<&str> =
        outputs.iter().filter(|o| !holds_meta(o)).map(|o| if o.is_load() { "--load" } else { o.type_name() }).collect();
    if dropping.is_empty() {
        return Ok(notes);
    }
    let what = dropping.join(", ");
    // Docker 20.10's classic image store has no place for either.
    if !args.annotations.is_empty() {
        notes.push(format!("note: --annotation: {what} cannot keep OCI annotations; pushed images and OCI archives get them"));
    }
    if provenance.as_ref().is_some_and(|p| !p.disabled) {
        notes.push(format!("note: --provenance: {what} cannot keep attestations; pushed images and OCI archives get them"));
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        build: BuildArgs,
    }

    fn args(flags: &[&str]) -> BuildArgs {
        Cli::parse_from(std::iter::once("hoist").chain(flags.iter().copied()).chain(std::iter::once("."))).build
    }

    fn provenance(flags: &[&str]) -> Option<v1::Provenance> {
        attestations(&args(flags)).unwrap().0
    }

    #[test]
    fn provenance_flags_read_as_buildx_reads_them() {
        // No flag: the builder's default (min), unless turned off in the environment.
        if std::env::var_os(NO_DEFAULT).is_none() {
            assert_eq!(provenance(&[]), None);
        }
        let off = Some(v1::Provenance { disabled: true, ..Default::default() });
        assert_eq!(provenance(&["--provenance=false"]), off);
        assert_eq!(provenance(&["--attest", "type=provenance,disabled=true"]), off);
        assert_eq!(provenance(&["--provenance=true"]).unwrap().mode, "max", "an explicit request is BuildKit's default, max");
        assert_eq!(provenance(&["--provenance", "mode=min"]).unwrap().mode, "min");
        let p = provenance(&["--attest", "type=provenance,mode=max,builder-id=https://ci/1,reproducible=1"]).unwrap();
        assert_eq!((p.mode.as_str(), p.builder_id.as_str(), p.reproducible, p.disabled), ("max", "https://ci/1", true, false));
        // --provenance comes after --attest: it wins, as in buildx.
        assert_eq!(provenance(&["--attest", "type=provenance,mode=max", "--provenance=false"]), off);
    }

    #[test]
    fn sbom_and_unknown_types_warn_and_bad_attests_fail() {
        let (_, w) = attestations(&args(&["--sbom=true"])).unwrap();
        assert!(w.iter().any(|w| w.contains("does not produce SBOM")), "{w:?}");
        assert!(attestations(&args(&["--sbom=false"])).unwrap().1.is_empty());
        let (_, w) = attestations(&args(&["--attest", "type=sbom,generator=x"])).unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
        let (_, w) = attestations(&args(&["--attest", "type=vex"])).unwrap();
        assert!(w[0].contains("type=vex"), "{w:?}");
        let e = attestations(&args(&["--attest", "mode=max"])).unwrap_err().to_string();
        assert!(e.contains("attestation type not specified"), "{e}");
        let e = attestations(&args(&["--attest", "type=provenance,disabled=maybe"])).unwrap_err().to_string();
        assert!(e.contains("disabled=\"maybe\""), "{e}");
    }

    #[test]
    fn outputs_that_cannot_keep_annotations_or_attestations_say_so() {
        let load = [OutputSpec::load()];
        let a = args(&["--annotation", "index:k=v", "--provenance=true", "--load"]);
        let n = notes(&a, &load).unwrap();
        assert!(n.iter().any(|n| n.contains("--annotation: --load cannot keep")), "{n:?}");
        assert!(n.iter().any(|n| n.contains("--provenance: --load cannot keep")), "{n:?}");
        let push = [OutputSpec::push(&["r/a:1".into()])];
        assert!(notes(&a, &push).unwrap().is_empty(), "a push keeps both");
        // The default provenance is not worth a note on --load (buildx skips it there too).
        assert!(notes(&args(&["--load"]), &load).unwrap().is_empty());
        let e = notes(&args(&["--annotation", "bogus:k=v"]), &push).unwrap_err().to_string();
        assert!(e.contains("unknown annotation type \"bogus\""), "{e}");
    }
}
