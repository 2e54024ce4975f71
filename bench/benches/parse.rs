//! Parsing speed of the Dockerfile frontend's syntax layer: a generated 2,000-line
//! Dockerfile (every instruction kind, continuations, comments, heredocs, flags) through
//! `parse` and through `parse` + stage grouping. The target is well under a millisecond
//! per line; the report prints time per line.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// A Dockerfile of at least `lines` lines (whole blocks).
fn dockerfile(lines: usize) -> String {
    let blocks: [&str; 12] = [
        "FROM --platform=$BUILDPLATFORM golang:1.22 AS build{n}\n",
        "ARG VERSION=1.{n} TARGETARCH\n",
        "ENV GOFLAGS=\"-mod=vendor\" CGO_ENABLED=0 N={n}\n",
        "# build the thing\nWORKDIR /src/{n}\n",
        "COPY --chown=1000:1000 --chmod=0644 go.mod go.sum ./\n",
        "RUN --mount=type=cache,target=/root/.cache/go-build,id=go{n} \\\n    --mount=type=secret,id=token \\\n    go build -o /out/app{n} ./cmd/app && \\\n    strip /out/app{n}\n",
        "RUN <<EOF\nset -e\necho building {n}\nEOF\n",
        "LABEL org.opencontainers.image.title=\"app {n}\" version=$VERSION\n",
        "EXPOSE 80{n} 443/tcp\n",
        "HEALTHCHECK --interval=30s --timeout=3s CMD wget -q -O- http://localhost/ || exit 1\n",
        "COPY --from=build{n} /out/app{n} /usr/local/bin/\n",
        "CMD [\"/usr/local/bin/app\", \"--port\", \"80\"]\n",
    ];
    let mut out = String::new();
    let mut n = 0;
    while out.lines().count() < lines {
        for b in blocks {
            out.push_str(&b.replace("{n}", &n.to_string()));
        }
        n += 1;
    }
    out
}

fn bench_parse(c: &mut Criterion) {
    let text = dockerfile(2000);
    let lines = text.lines().count() as u64;
    let df = hoist_dockerfile::parse(&text).expect("generated Dockerfile parses");
    hoist_dockerfile::parse_stages(&df).expect("generated Dockerfile has valid instructions");
    let mut g = c.benchmark_group("parse_2000_lines");
    g.throughput(Throughput::Elements(lines));
    g.bench_function("parse", |b| b.iter(|| hoist_dockerfile::parse(std::hint::black_box(&text)).unwrap()));
    g.bench_function("parse_and_group_stages", |b| {
        b.iter(|| {
            let df = hoist_dockerfile::parse(std::hint::black_box(&text)).unwrap();
            hoist_dockerfile::parse_stages(&df)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
