//! HCL and JSON bake files: `target`, `group` and `variable` blocks (top-level attributes are
//! variables too, as in buildx). Variables take their default, or the environment variable
//! of the same name (read as the default's type); strings interpolate `${...}` with
//! variables and the functions of [`functions`]. Every HCL and JSON file given shares one set
//! of variables, so an override file can change a default.

use std::str::FromStr;

use ::hcl::eval::{Context, Evaluate, FuncArgs, FuncDef, ParamType};
use ::hcl::{Expression, Number, Structure, Template, Value};
use anyhow::{anyhow, bail};

use super::{valid_name, Config, Group, Target, Val};

/// An attribute's expression: HCL, or a JSON value whose strings are templates.
enum Expr {
    Hcl(Expression),
    Json(serde_json::Value),
}

impl Expr {
    fn eval(&self, ctx: &Context) -> Result<Value, String> {
        match self {
            // The message without the expression it quotes (the caller names the attribute).
            Expr::Hcl(e) => e.evaluate(ctx).map_err(|e| e.to_string().split(" in expression").next().unwrap_or_default().to_string()),
            Expr::Json(v) => json_eval(v, ctx),
        }
    }
}

fn json_eval(v: &serde_json::Value, ctx: &Context) -> Result<Value, String> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::from(i),
            None => Value::from(n.as_f64().unwrap_or_default()),
        },
        J::String(s) if s.contains("${") || s.contains("%{") => {
            let t = Template::from_str(s).map_err(|e| e.to_string())?;
            Value::String(t.evaluate(ctx).map_err(|e| e.to_string())?)
        }
        J::String(s) => Value::String(s.clone()),
        J::Array(a) => Value::Array(a.iter().map(|x| json_eval(x, ctx)).collect::<Result<_, _>>()?),
        J::Object(o) => Value::Object(o.iter().map(|(k, v)| Ok((k.clone(), json_eval(v, ctx)?))).collect::<Result<_, String>>()?),
    })
}

/// A `target` or `group` block.
struct Block {
    group: bool,
    name: String,
    attrs: Vec<(String, Expr)>,
    line: usize,
}

/// A variable: its name, default (none: empty string) and line.
struct Var {
    name: String,
    default: Option<Expr>,
    line: usize,
}

/// One bake file, parsed but not evaluated.
pub struct File {
    name: String,
    vars: Vec<Var>,
    blocks: Vec<Block>,
}

/// The line (1-based) of the first line of `text` holding every one of `words`, else of the
/// last word alone (else 1): where a block or attribute is, for messages.
fn line_of(text: &str, words: &[&str]) -> usize {
    let find = |ws: &[&str]| text.lines().position(|l| ws.iter().all(|w| l.contains(w)));
    find(words).or_else(|| find(&words[words.len() - 1..])).map_or(1, |i| i + 1)
}

impl File {
    /// Parse `text` (file `name`): HCL, or JSON when `json`. Syntax errors name the line.
    pub fn parse(name: String, text: String, json: bool) -> anyhow::Result<File> {
        let mut f = File { name, vars: Vec::new(), blocks: Vec::new() };
        if json {
            f.parse_json(&text)?;
        } else {
            f.parse_hcl(&text)?;
        }
        Ok(f)
    }

    fn block(&mut self, kind: &str, name: String, attrs: Vec<(String, Expr)>, text: &str) -> anyhow::Result<()> {
        let line = line_of(text, &[kind, &format!("\"{name}\"")]);
        if kind == "variable" {
            let mut default = None;
            for (k, e) in attrs {
                match k.as_str() {
                    "default" => default = Some(e),
                    "description" | "type" | "sensitive" | "nullable" => {}
                    other => {
                        bail!("{}:{line}: variable {name:?}: unknown attribute {other:?} (expected default or description)", self.name)
                    }
                }
            }
            self.vars.push(Var { name, default, line });
            return Ok(());
        }
        if !valid_name(&name) {
            bail!("{}:{line}: {kind} name {name:?}: only letters, digits, _ and - are allowed", self.name);
        }
        self.blocks.push(Block { group: kind == "group", name, attrs, line });
        Ok(())
    }

    fn parse_hcl(&mut self, text: &str) -> anyhow::Result<()> {
        let body = ::hcl::parse(text).map_err(|e| match &e {
            ::hcl::Error::Parse(p) => anyhow!("{}:{}:{}: {}", self.name, p.location().line(), p.location().column(), p.message()),
            _ => anyhow!("{}: {e}", self.name),
        })?;
        for s in body.0 {
            let b = match s {
                Structure::Attribute(a) => {
                    let line = line_of(text, &[a.key.as_str(), "="]);
                    self.vars.push(Var { name: a.key.to_string(), default: Some(Expr::Hcl(a.expr)), line });
                    continue;
                }
                Structure::Block(b) => b,
            };
            let kind = b.identifier.as_str().to_string();
            let line = line_of(text, &[&kind]);
            match kind.as_str() {
                "target" | "group" | "variable" => {}
                "function" => bail!("{}:{line}: function blocks are not supported by hoist bake yet", self.name),
                other => bail!("{}:{line}: unknown block {other:?} (expected target, group or variable)", self.name),
            }
            let [label] = b.labels.as_slice() else {
                bail!("{}:{line}: a {kind} block takes one name: {kind} \"NAME\" {{ ... }}", self.name);
            };
            let name = label.as_str().to_string();
            let mut attrs = Vec::new();
            for s in b.body.0 {
                match s {
                    Structure::Attribute(a) => attrs.push((a.key.to_string(), Expr::Hcl(a.expr))),
                    // Variable validation blocks are not checked.
                    Structure::Block(_) if kind == "variable" => {}
                    Structure::Block(inner) => bail!(
                        "{}:{}: {kind} {name:?}: unexpected block {:?}",
                        self.name,
                        line_of(text, &[inner.identifier.as_str(), "{"]),
                        inner.identifier.as_str()
                    ),
                }
            }
            self.block(&kind, name, attrs, text)?;
        }
        Ok(())
    }

    fn parse_json(&mut self, text: &str) -> anyhow::Result<()> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| anyhow!("{}:{}:{}: {e}", self.name, e.line(), e.column()))?;
        let serde_json::Value::Object(top) = v else { bail!("{}: expected a JSON object with target, group and variable", self.name) };
        for (key, v) in top {
            match key.as_str() {
                "target" | "group" | "variable" => {
                    let serde_json::Value::Object(blocks) = v else {
                        bail!("{}:{}: {key} must be an object of {key}s by name", self.name, line_of(text, &[&format!("\"{key}\"")]))
                    };
                    for (name, body) in blocks {
                        let serde_json::Value::Object(attrs) = body else {
                            bail!("{}:{}: {key} {name:?} must be an object", self.name, line_of(text, &[&format!("\"{name}\"")]))
                        };
                        let attrs = attrs.into_iter().map(|(k, v)| (k, Expr::Json(v))).collect();
                        self.block(&key, name, attrs, text)?;
                    }
                }
                "function" => bail!("{}: function blocks are not supported by hoist bake yet", self.name),
                _ => {
                    let line = line_of(text, &[&format!("\"{key}\"")]);
                    self.vars.push(Var { name: key, default: Some(Expr::Json(v)), line });
                }
            }
        }
        Ok(())
    }
}

/// An evaluated value as a bake attribute takes it.
fn to_val(v: Value) -> Result<Val, String> {
    fn scalar(v: Value) -> Result<String, String> {
        match v {
            Value::String(s) => Ok(s),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(format!("expected a string, got {other}")),
        }
    }
    Ok(match v {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(b),
        Value::Number(n) => Val::Str(n.to_string()),
        Value::String(s) => Val::Str(s),
        Value::Array(a) => Val::List(a.into_iter().filter(|x| !x.is_null()).map(scalar).collect::<Result<_, _>>()?),
        Value::Object(o) => {
            Val::Map(o.into_iter().filter(|(_, x)| !x.is_null()).map(|(k, x)| Ok((k, scalar(x)?))).collect::<Result<_, String>>()?)
        }
    })
}

/// The value of variable `name` set to `s` in the environment, read as `default`'s type.
fn from_env(name: &str, s: String, default: Option<&Value>) -> Result<Value, String> {
    Ok(match default {
        Some(Value::Bool(_)) => Value::Bool(super::parse_bool(&s).ok_or_else(|| format!("${name}={s:?} is not a boolean"))?),
        Some(Value::Number(_)) => match s.trim().parse::<i64>() {
            Ok(i) => Value::from(i),
            Err(_) => Value::from(s.trim().parse::<f64>().map_err(|_| format!("${name}={s:?} is not a number"))?),
        },
        Some(Value::Array(_) | Value::Object(_)) => {
            let j: serde_json::Value = serde_json::from_str(&s).map_err(|e| format!("${name}: expected JSON like its default: {e}"))?;
            json_eval(&j, &Context::new())?
        }
        _ => Value::String(s),
    })
}

/// The host's platform, as buildx's BAKE_LOCAL_PLATFORM.
fn local_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm/v7",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}

/// Evaluate `files` together: variables first (defaults may use other variables, in any
/// order), then every target and group. `env` overrides variables.
pub fn evaluate(files: &[File], env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
    let mut ctx = Context::new();
    functions(&mut ctx);
    ctx.declare_var("BAKE_CMD_CONTEXT", ".");
    ctx.declare_var("BAKE_LOCAL_PLATFORM", local_platform());
    // A later definition of a variable wins.
    let mut pending: Vec<(&File, &Var)> = Vec::new();
    for f in files {
        for v in &f.vars {
            pending.retain(|(_, p)| p.name != v.name);
            pending.push((f, v));
        }
    }
    while !pending.is_empty() {
        let before = pending.len();
        let mut first_err = None;
        for (f, v) in std::mem::take(&mut pending) {
            let value = v.default.as_ref().map(|e| e.eval(&ctx)).transpose().and_then(|d| match env(&v.name) {
                Some(s) => from_env(&v.name, s, d.as_ref()),
                None => Ok(d.unwrap_or_else(|| Value::String(String::new()))),
            });
            match value {
                Ok(val) => ctx.declare_var(v.name.as_str(), val),
                Err(e) => {
                    first_err.get_or_insert_with(|| format!("{}:{}: variable {:?}: {e}", f.name, v.line, v.name));
                    pending.push((f, v));
                }
            }
        }
        // None could be evaluated this round: they use undefined variables, or each other.
        if pending.len() == before {
            bail!("{}", first_err.unwrap_or_default());
        }
    }
    let mut cfg = Config::default();
    for f in files {
        for b in &f.blocks {
            let at = |e: String| anyhow!("{}:{}: {} {:?}: {e}", f.name, b.line, if b.group { "group" } else { "target" }, b.name);
            let mut t = Target { name: b.name.clone(), ..Target::default() };
            let mut g = Group { name: b.name.clone(), ..Group::default() };
            for (k, e) in &b.attrs {
                let v = e.eval(&ctx).and_then(to_val).map_err(|err| at(format!("{k}: {err}")))?;
                if b.group {
                    match (k.as_str(), v) {
                        ("targets", Val::List(l)) => g.targets = l,
                        ("targets", Val::Str(s)) => g.targets = vec![s],
                        ("description", Val::Str(s)) => g.description = Some(s),
                        (k, _) => return Err(at(format!("unknown or invalid attribute {k:?} (a group has targets = [...])"))),
                    }
                } else {
                    t.set_attr(k, v).map_err(|err| at(format!("{k}: {err}").replace(&format!("{k}: {k} "), &format!("{k} "))))?;
                }
            }
            let mut one = Config::default();
            if b.group {
                one.groups.push(g);
            } else {
                one.targets.push(t);
            }
            cfg.merge(one);
        }
    }
    Ok(cfg)
}

fn s(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok(String::new()),
        other => Err(format!("expected a string, got {other}")),
    }
}

fn num(v: &Value) -> Result<f64, String> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{n} is not a number")),
        Value::String(t) => t.trim().parse().map_err(|_| format!("{t:?} is not a number")),
        other => Err(format!("expected a number, got {other}")),
    }
}

fn number(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9e15 {
        Value::from(f as i64)
    } else {
        Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}

fn str_fn(f: fn(&str) -> String) -> impl Fn(FuncArgs) -> Result<Value, String> {
    move |a| Ok(Value::String(f(&s(&a[0])?)))
}

/// Go's fmt verbs as HCL's format() uses them: %s %d %v %q %%, in order.
fn format_go(fmt: &str, args: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    let mut args = args.iter();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(v @ ('s' | 'd' | 'v' | 'q')) => {
                let a = args.next().ok_or_else(|| format!("format {fmt:?}: too few arguments"))?;
                let text = s(a)?;
                if v == 'q' {
                    out.push_str(&format!("{text:?}"));
                } else {
                    out.push_str(&text);
                }
            }
            other => return Err(format!("format {fmt:?}: unsupported verb %{}", other.map(String::from).unwrap_or_default())),
        }
    }
    Ok(out)
}

/// The functions bake files use most (buildx has the HCL standard library; these are the
/// common ones in CI files).
fn functions(ctx: &mut Context) {
    use ParamType::{Any, Array, Bool, String as Str};
    let any_list = || Array(Box::new(Any));
    let def = |params: Vec<ParamType>, variadic: Option<ParamType>, f: ::hcl::eval::Func| {
        let mut b = FuncDef::builder().params(params);
        if let Some(v) = variadic {
            b = b.variadic_param(v);
        }
        b.build(f)
    };
    let funcs: Vec<(&str, FuncDef)> = vec![
        ("and", def(vec![], Some(Bool), |a| Ok(Value::Bool(a.iter().all(|v| v.as_bool() == Some(true)))))),
        ("or", def(vec![], Some(Bool), |a| Ok(Value::Bool(a.iter().any(|v| v.as_bool() == Some(true)))))),
        ("not", def(vec![Bool], None, |a| Ok(Value::Bool(a[0].as_bool() != Some(true))))),
        ("equal", def(vec![Any, Any], None, |a| Ok(Value::Bool(a[0] == a[1])))),
        ("notequal", def(vec![Any, Any], None, |a| Ok(Value::Bool(a[0] != a[1])))),
        ("lower", def(vec![Str], None, |a| str_fn(str::to_lowercase)(a))),
        ("upper", def(vec![Str], None, |a| str_fn(str::to_uppercase)(a))),
        ("trimspace", def(vec![Str], None, |a| str_fn(|x| x.trim().to_string())(a))),
        ("chomp", def(vec![Str], None, |a| str_fn(|x| x.trim_end_matches(['\r', '\n']).to_string())(a))),
        (
            "title",
            def(vec![Str], None, |a| {
                str_fn(|x| {
                    let mut up = true;
                    x.chars()
                        .map(|c| {
                            let o = if up { c.to_uppercase().next().unwrap_or(c) } else { c };
                            up = c.is_whitespace();
                            o
                        })
                        .collect()
                })(a)
            }),
        ),
        (
            "trimprefix",
            def(vec![Str, Str], None, |a| Ok(Value::String(s(&a[0])?.strip_prefix(&s(&a[1])?).map(str::to_string).unwrap_or(s(&a[0])?)))),
        ),
        (
            "trimsuffix",
            def(vec![Str, Str], None, |a| Ok(Value::String(s(&a[0])?.strip_suffix(&s(&a[1])?).map(str::to_string).unwrap_or(s(&a[0])?)))),
        ),
        (
            "trim",
            def(vec![Str, Str], None, |a| {
                let cut: Vec<char> = s(&a[1])?.chars().collect();
                Ok(Value::String(s(&a[0])?.trim_matches(cut.as_slice()).to_string()))
            }),
        ),
        ("replace", def(vec![Str, Str, Str], None, |a| Ok(Value::String(s(&a[0])?.replace(&s(&a[1])?, &s(&a[2])?))))),
        (
            "split",
            def(vec![Str, Str], None, |a| Ok(Value::Array(s(&a[1])?.split(&s(&a[0])?).map(|x| Value::String(x.to_string())).collect()))),
        ),
        (
            "join",
            def(vec![Str], Some(any_list()), |a| {
                let mut parts = Vec::new();
                for l in a.variadic_args() {
                    for v in l.as_array().into_iter().flatten() {
                        parts.push(s(v)?);
                    }
                }
                Ok(Value::String(parts.join(&s(&a[0])?)))
            }),
        ),
        (
            "substr",
            def(vec![Str, ParamType::Number, ParamType::Number], None, |a| {
                let chars: Vec<char> = s(&a[0])?.chars().collect();
                let (off, len) = (num(&a[1])? as i64, num(&a[2])? as i64);
                let start = if off < 0 { (chars.len() as i64 + off).max(0) } else { off.min(chars.len() as i64) } as usize;
                let end = if len < 0 { chars.len() } else { (start + len as usize).min(chars.len()) };
                Ok(Value::String(chars[start..end].iter().collect()))
            }),
        ),
        ("format", def(vec![Str], Some(Any), |a| Ok(Value::String(format_go(&s(&a[0])?, &a[1..])?)))),
        ("timestamp", def(vec![], None, |_| Ok(Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true))))),
        (
            "coalesce",
            def(vec![], Some(Any), |a| Ok(a.iter().find(|v| !v.is_null() && v.as_str() != Some("")).cloned().unwrap_or(Value::Null))),
        ),
        (
            "concat",
            def(vec![], Some(any_list()), |a| Ok(Value::Array(a.iter().flat_map(|l| l.as_array().cloned().unwrap_or_default()).collect()))),
        ),
        ("contains", def(vec![any_list(), Any], None, |a| Ok(Value::Bool(a[0].as_array().is_some_and(|l| l.contains(&a[1])))))),
        (
            "length",
            def(vec![Any], None, |a| match &a[0] {
                Value::String(t) => Ok(Value::from(t.chars().count() as i64)),
                Value::Array(l) => Ok(Value::from(l.len() as i64)),
                Value::Object(o) => Ok(Value::from(o.len() as i64)),
                other => Err(format!("length of {other}: expected a string, list or map")),
            }),
        ),
        (
            "distinct",
            def(vec![any_list()], None, |a| {
                let mut out: Vec<Value> = Vec::new();
                for v in a[0].as_array().into_iter().flatten() {
                    if !out.contains(v) {
                        out.push(v.clone());
                    }
                }
                Ok(Value::Array(out))
            }),
        ),
        (
            "keys",
            def(vec![ParamType::Object(Box::new(Any))], None, |a| {
                Ok(Value::Array(a[0].as_object().into_iter().flat_map(|o| o.keys().map(|k| Value::String(k.clone()))).collect()))
            }),
        ),
        (
            "values",
            def(vec![ParamType::Object(Box::new(Any))], None, |a| {
                Ok(Value::Array(a[0].as_object().into_iter().flat_map(|o| o.values().cloned()).collect()))
            }),
        ),
        (
            "lookup",
            def(vec![ParamType::Object(Box::new(Any)), Str], Some(Any), |a| {
                let key = s(&a[1])?;
                match a[0].as_object().and_then(|o| o.get(&key)) {
                    Some(v) => Ok(v.clone()),
                    None => a.get(2).cloned().ok_or_else(|| format!("lookup: no key {key:?} and no default")),
                }
            }),
        ),
        ("abs", def(vec![ParamType::Number], None, |a| Ok(number(num(&a[0])?.abs())))),
        (
            "max",
            def(vec![], Some(ParamType::Number), |a| {
                a.iter()
                    .map(num)
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .reduce(f64::max)
                    .map(number)
                    .ok_or_else(|| "max: no numbers".into())
            }),
        ),
        (
            "min",
            def(vec![], Some(ParamType::Number), |a| {
                a.iter()
                    .map(num)
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .reduce(f64::min)
                    .map(number)
                    .ok_or_else(|| "min: no numbers".into())
            }),
        ),
    ];
    for (name, f) in funcs {
        ctx.declare_func(name, f);
    }
}
