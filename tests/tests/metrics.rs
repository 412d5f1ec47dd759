//! The shipped Grafana dashboard against the real binaries: a coordinator, an exit and a node run
//! in a lab with `--metrics-listen`, each `/metrics` is scraped, and every metric the dashboard
//! queries (and every label it groups or filters by) must be served by one of them.

use anyhow::{Context, Result, bail};
use homeport_tests::{Lab, VPS_IP, require_root_and, wait_for};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Sample names served, each with the label names seen on its samples.
type Served = BTreeMap<String, BTreeSet<String>>;

/// Reads a Prometheus/OpenMetrics text exposition: every sample's name and label names, and for
/// each histogram family its `_bucket`/`_sum`/`_count` names too (a summary's `_sum`/`_count`).
fn parse_exposition(text: &str, out: &mut Served) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let suffixes: &[&str] = match (it.next(), it.next()) {
                (Some(_), Some("histogram")) => &["_bucket", "_sum", "_count"],
                (Some(_), Some("summary")) => &["_sum", "_count"],
                _ => &[],
            };
            let name = rest.split_whitespace().next().unwrap_or_default();
            for suffix in suffixes {
                out.entry(format!("{name}{suffix}")).or_default();
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..end].to_string()).or_default();
        if line[end..].starts_with('{') {
            let close = line.find('}').unwrap_or(line.len());
            for pair in line[end + 1..close].split(',') {
                if let Some((k, _)) = pair.split_once('=') {
                    labels.insert(k.trim().to_string());
                }
            }
        }
    }
}

/// Every `homeport_…` metric name in `s` (`homeport_.*`, a regular expression over all of them,
/// is not a name).
fn metric_names(s: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = s;
    while let Some(i) = rest.find("homeport_") {
        let tail = &rest[i..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if len > "homeport_".len() {
            out.insert(tail[..len].to_string());
        }
        rest = &tail[len..];
    }
    out
}

/// The label names a query groups by (`by (a, b)`), filters on (`{a=~"…"}`) or asks the values of
/// (`label_values(metric, a)`), without the ones Prometheus adds itself.
fn label_names(q: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut add_list = |list: &str| {
        for l in list.split(',') {
            let l = l.trim();
            if !l.is_empty() {
                out.insert(l.to_string());
            }
        }
    };
    for (i, _) in q.match_indices("by (") {
        let list = &q[i + 4..];
        add_list(&list[..list.find(')').unwrap_or(list.len())]);
    }
    if let Some(args) = q.strip_prefix("label_values(")
        && let Some((_, label)) = args.trim_end_matches(')').rsplit_once(',')
    {
        add_list(label);
    }
    for (i, _) in q.match_indices('{') {
        let body = &q[i + 1..];
        for m in body[..body.find('}').unwrap_or(body.len())].split(',') {
            let key = m.split(['=', '!']).next().unwrap_or("").trim();
            add_list(key);
        }
    }
    for builtin in ["instance", "job", "__name__"] {
        out.remove(builtin);
    }
    out
}

/// Every query string of the dashboard: panel targets' `expr` and the template variables'
/// `query`/`definition`.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if matches!(k.as_str(), "expr" | "query" | "definition")
                    && let Some(s) = x.as_str()
                {
                    out.push(s.to_string());
                }
                dashboard_queries(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

/// What the dashboard asks for and no binary serves, one line each.
fn missing_from(dashboard: &str, served: &Served) -> Result<Vec<String>> {
    let v: serde_json::Value =
        serde_json::from_str(dashboard).context("deploy/grafana-dashboard.json is not JSON")?;
    let mut queries = vec![];
    dashboard_queries(&v, &mut queries);
    let mut missing = vec![];
    for q in queries.iter().filter(|q| q.contains("homeport_")) {
        let names = metric_names(q);
        for name in &names {
            if !served.contains_key(name) {
                missing.push(format!("metric {name} (in `{q}`)"));
            }
        }
        for label in label_names(q) {
            let carried = names
                .iter()
                .any(|n| served.get(n).is_some_and(|ls| ls.contains(&label)));
            if !names.is_empty() && !carried {
                missing.push(format!("label {label} on {names:?} (in `{q}`)"));
            }
        }
    }
    Ok(missing)
}

#[test]
fn dashboard_queries_only_metrics_the_binaries_serve() -> Result<()> {
    if !require_root_and(&["curl"]) {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    lab.internet()?;
    let coord =
        lab.start_coordinator_with("vps", VPS_IP, &["--metrics-listen", "127.0.0.1:9101"])?;
    let key = coord.authkey(true)?;
    lab.add_host("home")?;
    lab.link("net", "10.1.1.1/24", "home", "10.1.1.2/24")?;
    lab.default_route("home", "10.1.1.1")?;
    let exit = lab.start_exit(
        "vps",
        &coord,
        &key,
        "vps",
        &["--metrics-listen", "127.0.0.1:9103"],
    )?;
    let home = lab.start_node_with(
        "home",
        &coord,
        &key,
        "home",
        &["--metrics-listen", "127.0.0.1:9102"],
    )?;
    // A rule and a peer each, so that the per-rule and per-peer families have samples.
    coord.publish("vps", 32400, "home:32400")?;
    let scrape = |lab: &Lab, host: &str, port: u16| -> Result<String> {
        lab.exec(
            host,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                &format!("http://127.0.0.1:{port}/metrics"),
            ],
        )
    };
    let ready = |lab: &Lab| -> Result<Option<Served>> {
        let coordinator = scrape(lab, "vps", 9101)?;
        let exit = scrape(lab, "vps", 9103)?;
        let node = scrape(lab, "home", 9102)?;
        let mut served = Served::new();
        for text in [&coordinator, &exit, &node] {
            parse_exposition(text, &mut served);
        }
        let has = |n: &str| served.contains_key(n);
        // Until the exit has the rule and the node its peer, those families are empty.
        Ok(
            (has("homeport_exit_connections_total") && has("homeport_node_peer_rx_bytes_total"))
                .then_some(served),
        )
    };
    let served = wait_for(
        "the exit to serve the rule's metrics and the node its peer's",
        Duration::from_secs(30),
        || match ready(&lab) {
            Ok(Some(s)) => Some(Ok(s)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        },
    )??;
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json"),
    )?;
    let missing = missing_from(&dashboard, &served)?;
    if !missing.is_empty() {
        bail!(
            "deploy/grafana-dashboard.json asks for what no binary serves:\n  {}\nserved: {:?}",
            missing.join("\n  "),
            served.keys().collect::<Vec<_>>()
        );
    }
    // Every binary names its metrics homeport_<role>_….
    for name in served.keys() {
        assert!(
            ["homeport_coordinator_", "homeport_node_", "homeport_exit_"]
                .iter()
                .any(|p| name.starts_with(p)),
            "{name} is not named homeport_<role>_…"
        );
    }
    drop((exit, home));
    Ok(())
}

#[test]
fn a_dashboard_metric_or_label_nobody_serves_is_reported() {
    let mut served = Served::new();
    parse_exposition(
        "# TYPE homeport_coordinator_api_request_duration_seconds histogram\n\
         homeport_exit_connections_total{rule=\"1\",proto=\"tcp\",port=\"32400\"} 0\n\
         # EOF\n",
        &mut served,
    );
    let dash = r#"{"panels": [{"targets": [
        {"expr": "sum by (rule) (rate(homeport_exit_connections_total{instance=~\"$i\"}[5m]))"},
        {"expr": "histogram_quantile(0.9, homeport_coordinator_api_request_duration_seconds_bucket)"},
        {"expr": "sum by (rule, verdict) (homeport_exit_connections_total)"},
        {"expr": "homeport_nodes_online"}]}],
        "templating": {"list": [{"query": {"query": "label_values({__name__=~\"homeport_.*\"}, instance)"}}]}}"#;
    let missing = missing_from(dash, &served).unwrap();
    assert_eq!(missing.len(), 2, "{missing:?}");
    assert!(missing[0].starts_with("label verdict"), "{missing:?}");
    assert!(
        missing[1].starts_with("metric homeport_nodes_online"),
        "{missing:?}"
    );
}
