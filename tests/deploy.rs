//! The files of `deploy/`, checked with the tools this machine has: the
//! systemd unit by `systemd-analyze verify` and `security`, its users and
//! directories by `systemd-sysusers` and `systemd-tmpfiles` into a scratch
//! root, the certificate script by running it and serving with what it
//! made; the Dockerfile, Kubernetes manifests and compose file (no Docker
//! engine, kubectl or registry here) are parsed and their fields that
//! matter asserted, and the master key's mode under a Kubernetes `fsGroup`
//! is given to a real server running as the pod's user.

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use common::*;
use serde_norway::Value;

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn skip(what: &str) {
    // Straight to the terminal: the harness captures a test's stderr.
    let _ = std::fs::write("/dev/tty", format!("*** SKIPPED {what} ***\n"));
    eprintln!("*** SKIPPED {what} ***");
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            let mut v = Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            v.apply_merge().unwrap();
            v
        })
        .collect()
}

/// `key=value` lines of a unit's `[Service]` section (repeated keys kept).
fn unit_service(text: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap();
        out.push((k.to_string(), v.to_string()));
    }
    out
}

/// The production config's writable places: data_dir, the directories of
/// alert_file, audit.mirror_file and the shred list, backup.dir.
fn config_writable_dirs() -> BTreeSet<PathBuf> {
    let c = coffre::config::Config::load_with_env(Some(&deploy("coffre.toml")), |_| None).unwrap();
    let parent = |p: &Path| p.parent().unwrap().to_path_buf();
    [
        c.data_dir.clone(),
        parent(c.alert_file.as_ref().unwrap()),
        parent(c.audit.mirror_file.as_ref().unwrap()),
        parent(&c.shred_list_path()),
        c.backup.dir.clone().unwrap(),
    ]
    .into_iter()
    .collect()
}

#[test]
fn the_systemd_unit_is_hardened_and_verifies() {
    let text = std::fs::read_to_string(deploy("systemd/coffre.service")).unwrap();
    let service = unit_service(&text);
    let get = |k: &str| -> Vec<&str> {
        service
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (k, v) in [
        ("User", "coffre"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LimitCORE", "0"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("ProtectHome", "yes"),
    ] {
        assert_eq!(get(k), vec![v], "{k}");
    }
    // The master key through systemd's credentials, the config pointed at it.
    assert_eq!(
        get("LoadCredential"),
        vec!["master.key:/etc/coffre/master.key"]
    );
    assert!(get("Environment").contains(&"COFFRE_MASTER_KEY_FILE=%d/master.key"));
    // Writable: exactly the directories the production config writes.
    let rw: BTreeSet<PathBuf> = get("ReadWritePaths")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(PathBuf::from)
        .collect();
    assert_eq!(rw, config_writable_dirs());
    // Reload = SIGHUP (TLS files, deny list, line files).
    assert!(get("ExecReload")[0].contains("-HUP"));

    if !have("systemd-analyze") {
        skip("systemd-analyze checks: systemd-analyze not installed");
        return;
    }
    // verify wants the ExecStart binary to exist: point it at this build.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("coffre.service");
    std::fs::write(&unit, text.replace("/usr/local/bin/coffre", bin())).unwrap();
    let out = run_ok(Command::new("systemd-analyze").args(["verify", unit.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("coffre.service"),
        "systemd-analyze verify complains: {err}"
    );
    let out = run_ok(Command::new("systemd-analyze").args([
        "security",
        "--offline=true",
        unit.to_str().unwrap(),
    ]));
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    let level: f64 = report
        .lines()
        .find_map(|l| l.split("coffre.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {report}"));
    assert!(level <= 2.0, "exposure {level}:\n{report}");
}

#[test]
fn sysusers_and_tmpfiles_make_the_user_and_private_directories() {
    if !have("systemd-sysusers") || !have("systemd-tmpfiles") {
        skip("sysusers/tmpfiles checks: systemd tools not installed");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for (src, dst) in [
        (
            "systemd/coffre.sysusers.conf",
            "usr/lib/sysusers.d/coffre.conf",
        ),
        (
            "systemd/coffre.tmpfiles.conf",
            "usr/lib/tmpfiles.d/coffre.conf",
        ),
    ] {
        let to = r.join(dst);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(deploy(src), to).unwrap();
    }
    std::fs::create_dir_all(r.join("etc")).unwrap();
    let root_arg = format!("--root={}", r.display());
    run_ok(Command::new("systemd-sysusers").arg(&root_arg));
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    let line = passwd.lines().find(|l| l.starts_with("coffre:")).unwrap();
    let f: Vec<&str> = line.split(':').collect();
    assert!(f[6].ends_with("nologin"), "{line}");
    let uid: u32 = f[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system account: {line}");
    run_ok(Command::new("systemd-tmpfiles").args([&root_arg, "--create"]));
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // Every writable directory exists, the service's own, private.
    for d in config_writable_dirs() {
        let m = std::fs::metadata(r.join(d.strip_prefix("/").unwrap()))
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        assert_eq!(m.permissions().mode() & 0o777, 0o700, "{}", d.display());
        assert_eq!(m.uid(), uid, "{}", d.display());
    }
    // The config and TLS directories: root writes, the service reads.
    let m = std::fs::metadata(r.join("etc/coffre/tls")).unwrap();
    assert_eq!((m.uid(), m.permissions().mode() & 0o777), (0, 0o750));
}

#[test]
fn the_dockerfile_builds_in_stages_and_runs_without_root_or_shell() {
    let text = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    // Instructions with their continuation lines joined.
    let joined = text.replace("\\\n", " ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage");
    assert!(lines[froms[0]].contains(" AS build"));
    let last = &lines[*froms.last().unwrap()..];
    assert!(
        last[0].contains("distroless") && last[0].contains("nonroot"),
        "no shell in the final image: {}",
        last[0]
    );
    assert!(
        !last.iter().any(|l| l.starts_with("RUN ")),
        "nothing runs in the final stage"
    );
    let user = last
        .iter()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a numeric uid");
    assert_ne!(uid, 0);
    // Exec forms only (no shell to interpret anything else).
    for k in ["ENTRYPOINT ", "CMD "] {
        let l = last.iter().find(|l| l.starts_with(k)).unwrap();
        assert!(l[k.len()..].trim_start().starts_with('['), "{l}");
    }
    let health = last.iter().find(|l| l.starts_with("HEALTHCHECK")).unwrap();
    assert!(
        health.contains("CMD [\"/usr/local/bin/coffre\", \"health\""),
        "{health}"
    );
    // The probe port of the health check is the image config's metrics.listen.
    let c = coffre::config::Config::load_with_env(Some(&deploy("coffre.container.toml")), |_| None)
        .unwrap();
    let port = c
        .metrics
        .listen
        .as_ref()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert!(health.contains(&format!("127.0.0.1:{port}")), "{health}");
    // Secrets are mounted, never copied in.
    assert!(
        !last
            .iter()
            .any(|l| l.starts_with("COPY") && l.contains(".key"))
    );
    assert!(c.master_key_file.starts_with("/run/secrets"));
    assert!(c.tls.key.as_ref().unwrap().starts_with("/run/secrets"));
    let ignore =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".dockerignore"))
            .unwrap();
    for must in ["target/", "keys/", "**/*.key"] {
        assert!(
            ignore.lines().any(|l| l == must),
            ".dockerignore lacks {must}"
        );
    }
}

/// The pod spec of every workload manifest.
fn workloads() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(deploy("kubernetes")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        for doc in yaml_docs(&p) {
            assert!(
                doc["apiVersion"].is_string() && doc["kind"].is_string(),
                "{}",
                p.display()
            );
            assert_eq!(doc["metadata"]["namespace"], "coffre", "{}", p.display());
            let kind = doc["kind"].as_str().unwrap().to_string();
            if kind == "StatefulSet" || kind == "Deployment" {
                out.push((kind, doc));
            }
        }
    }
    out
}

#[test]
fn kubernetes_workloads_run_unprivileged_with_grpc_probes_and_read_only_secrets() {
    let w = workloads();
    let kinds: BTreeSet<&str> = w.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, BTreeSet::from(["Deployment", "StatefulSet"]));
    let config = yaml_docs(&deploy("kubernetes/configmap.yaml"));
    let toml_text = config[0]["data"]["coffre.toml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.toml"), toml_text).unwrap();
    let c =
        coffre::config::Config::load_with_env(Some(&dir.path().join("c.toml")), |_| None).unwrap();
    let probe_port: u64 = c
        .metrics
        .listen
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    for (kind, doc) in &w {
        let spec = &doc["spec"];
        let pod = &spec["template"]["spec"];
        if kind == "StatefulSet" {
            assert_eq!(spec["replicas"], 1, "sled is one process");
            assert!(spec["volumeClaimTemplates"].as_sequence().is_some());
        } else {
            assert!(spec["replicas"].as_u64().unwrap() >= 2, "several nodes");
        }
        let annotations = &spec["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(
            annotations["prometheus.io/port"],
            probe_port.to_string().as_str()
        );
        let sc = &pod["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{kind}");
        assert_ne!(sc["runAsUser"].as_u64().unwrap(), 0);
        // The Secret's group is the server's own: the key check passes.
        assert_eq!(sc["fsGroup"], sc["runAsGroup"], "{kind}");
        assert_eq!(pod["automountServiceAccountToken"], false);
        let container = &pod["containers"][0];
        let csc = &container["securityContext"];
        assert_eq!(csc["allowPrivilegeEscalation"], false);
        assert_eq!(csc["readOnlyRootFilesystem"], true);
        assert_eq!(csc["capabilities"]["drop"][0], "ALL");
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            assert_eq!(
                container[probe]["grpc"]["port"].as_u64(),
                Some(probe_port),
                "{kind} {probe}: native gRPC probe on the probe port"
            );
        }
        // Secrets: mounted read-only; the master key 0400 before fsGroup.
        let volumes = pod["volumes"].as_sequence().unwrap();
        let claims: Vec<&Value> = spec["volumeClaimTemplates"]
            .as_sequence()
            .map(|c| c.iter().map(|c| &c["metadata"]["name"]).collect())
            .unwrap_or_default();
        for m in container["volumeMounts"].as_sequence().unwrap() {
            let Some(v) = volumes.iter().find(|v| v["name"] == m["name"]) else {
                assert!(
                    claims.contains(&&m["name"]),
                    "{kind}: {:?} from nowhere",
                    m["name"]
                );
                continue;
            };
            if v.get("secret").is_some() || v.get("configMap").is_some() {
                assert_eq!(m["readOnly"], true, "{kind}: {:?}", m["name"]);
            }
        }
        let key = volumes.iter().find(|v| v["name"] == "master-key").unwrap();
        let mode = key["secret"]["defaultMode"].as_u64().unwrap() as u32;
        assert_eq!(mode, 0o400, "{kind}");
        let mount = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "master-key")
            .unwrap();
        let at = Path::new(mount["mountPath"].as_str().unwrap()).join("master.key");
        assert_eq!(at, c.master_key_file, "the config reads the mounted key");
    }
    let pdb = yaml_docs(&deploy("kubernetes/pdb.yaml"));
    assert_eq!(pdb[0]["kind"], "PodDisruptionBudget");
    let np = yaml_docs(&deploy("kubernetes/networkpolicy.yaml"));
    assert_eq!(np[0]["kind"], "NetworkPolicy");
    let ports: BTreeSet<u64> = np[0]["spec"]["ingress"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r["ports"][0]["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, BTreeSet::from([50051, probe_port]));
}

/// What the kubelet makes of the master key Secret, given to a real server
/// running as the pod's user: `defaultMode` 0400 plus the group's read bit
/// under `fsGroup` (root:fsGroup 0440) starts; the same file without
/// fsGroup (root:root 0400) or with another group is refused in one line.
#[tokio::test]
async fn the_master_key_secret_as_the_kubelet_mounts_it_is_accepted_by_the_pods_user() {
    if !nix::unistd::geteuid().is_root() {
        skip("the pod-user key test: it needs root (to run the server as uid 65532)");
        return;
    }
    let (_, doc) = workloads().into_iter().next().unwrap();
    let sc = &doc["spec"]["template"]["spec"]["securityContext"];
    let uid = sc["runAsUser"].as_u64().unwrap() as u32;
    let fs_group = sc["fsGroup"].as_u64().unwrap() as u32;
    let volumes = doc["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .clone();
    let default_mode =
        volumes.iter().find(|v| v["name"] == "master-key").unwrap()["secret"]["defaultMode"]
            .as_u64()
            .unwrap() as u32;

    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::set_permissions(r, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secrets = r.join("secret");
    let data = r.join("data");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::create_dir(&data).unwrap();
    nix::unistd::chown(&data, Some(uid.into()), Some(fs_group.into())).unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = secrets.join("master.key");
    coffre::keys::generate_key_file(&key).unwrap();
    let cfg = r.join("coffre.toml");
    std::fs::write(
        &cfg,
        format!(
            "dev = true\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nmaster_key_file = {key:?}\n\
             [keys]\nshred_list_file = {:?}\n[argon2]\nm_kib = 64\nt = 1\np = 1\n[storage]\nmin_free_mib = 1\n",
            data.join("d"),
            data.join("shredded"),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let serve = |mode: u32, group: u32| {
        nix::unistd::chown(&key, Some(0.into()), Some(group.into())).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = Command::new(bin())
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .uid(uid)
            .gid(fs_group)
            .env("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("COFFRE_LOG", "warn")
            .env("COFFRE_STORAGE_BACKEND", "sled")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = out.id();
        // A start prints its listening line; a refusal exits at once.
        let killer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(3));
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        });
        let o = out.wait_with_output().unwrap();
        killer.join().unwrap();
        (
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    use std::os::unix::process::CommandExt;
    // With fsGroup: root:fsGroup, defaultMode | 0440.
    let (out, err) = serve(default_mode | 0o440, fs_group);
    assert!(out.contains("listening on"), "fsGroup mount refused: {err}");
    // Without fsGroup: root:root 0400, unreadable by the pod's user.
    let (out, err) = serve(default_mode, 0);
    assert!(!out.contains("listening on"));
    assert!(
        err.trim().lines().count() == 1 && err.contains("master.key"),
        "{err}"
    );
    // fsGroup unlike the pod's group: readable by a group not the server's.
    let (out, err) = serve(0o440, 4242);
    assert!(!out.contains("listening on"));
    assert!(err.contains("not the server's own group"), "{err}");
}

#[test]
fn the_compose_trial_has_two_locked_down_nodes_a_database_and_prometheus() {
    let doc = &yaml_docs(&deploy("compose.yml"))[0];
    let services = doc["services"].as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["coffre-1", "coffre-2", "postgres", "prometheus"])
    );
    for node in ["coffre-1", "coffre-2"] {
        let s = &doc["services"][node];
        assert_eq!(s["user"], "65532:65532", "{node}");
        assert_eq!(s["read_only"], true);
        assert_eq!(s["cap_drop"][0], "ALL");
        assert_eq!(s["environment"]["COFFRE_STORAGE_BACKEND"], "postgres");
        assert_eq!(s["healthcheck"]["test"][2], "health");
        let vols: Vec<&str> = s["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            vols.iter()
                .any(|v| v.contains("master.key") && v.ends_with(":ro"))
        );
        for p in s["ports"].as_sequence().unwrap() {
            assert!(
                p.as_str().unwrap().starts_with("127.0.0.1:"),
                "{node}: {p:?}"
            );
        }
    }
    // Prometheus scrapes both nodes' probe ports and loads the rules.
    let prom = &yaml_docs(&deploy("prometheus/prometheus.yml"))[0];
    let targets: BTreeSet<&str> = prom["scrape_configs"][0]["static_configs"][0]["targets"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(targets, BTreeSet::from(["coffre-1:9464", "coffre-2:9464"]));
    assert!(
        doc["services"]["prometheus"]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v.as_str().unwrap().contains("coffre-rules.yml"))
    );
}

/// The certificate script of the operations guide, run for real; a server
/// serves mTLS with what it made, and the CLI gets in with the client
/// certificate (and not without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_certs_gives_a_working_mtls_setup() {
    if !have("openssl") && Command::new("openssl").arg("version").output().is_err() {
        skip("make-certs.sh: openssl not installed");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    run_ok(
        Command::new("bash")
            .arg(deploy("make-certs.sh"))
            .arg(&tls)
            .args(["localhost", "127.0.0.1"]),
    );
    // Never over existing keys.
    let again = Command::new("bash")
        .arg(deploy("make-certs.sh"))
        .arg(&tls)
        .output()
        .unwrap();
    assert!(!again.status.success());
    use std::os::unix::fs::PermissionsExt;
    for k in ["ca.key", "server.key", "client.key"] {
        let mode = std::fs::metadata(tls.join(k)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{k}");
    }
    let data = root.path().join("data");
    let key = root.path().join("master.key");
    coffre::keys::generate_key_file(&key).unwrap();
    let cfg = root.path().join("coffre.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {data:?}\nmaster_key_file = {key:?}\n\
             [tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\
             [argon2]\nm_kib = 64\nt = 1\np = 1\n[storage]\nbackend = \"sled\"\nmin_free_mib = 64\n",
            tls.join("server.pem"),
            tls.join("server.key"),
            tls.join("ca.pem"),
        ),
    )
    .unwrap();
    let p = spawn_server(
        &cfg,
        &[
            ("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD),
            ("COFFRE_STORAGE_BACKEND", "sled"),
        ],
    )
    .unwrap();
    let port = p.addr.rsplit(':').next().unwrap();
    let health = |client: bool| {
        let mut cmd = Command::new(bin());
        cmd.args(["--addr", &format!("https://localhost:{port}")])
            .arg("--ca")
            .arg(tls.join("ca.pem"))
            .env_remove("COFFRE_CLIENT_CERT")
            .env_remove("COFFRE_CLIENT_KEY");
        if client {
            cmd.arg("--client-cert")
                .arg(tls.join("client.pem"))
                .arg("--client-key")
                .arg(tls.join("client.key"));
        }
        cmd.args(["health", "--json"]).output().unwrap()
    };
    let ok = health(true);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["status"], "SERVING");
    let refused = health(false);
    assert!(!refused.status.success());
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr)
            .trim()
            .lines()
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coffre_health_answers_from_the_probe_port_and_fails_when_nothing_listens() {
    let root = tempfile::tempdir().unwrap();
    let config = test_config_with(root.path(), "[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let s = TestServer::start_with(root, config).await;
    let addr = format!("http://{}", s.metrics_addr.clone().unwrap());
    let ok = Command::new(bin())
        .args(["--addr", &addr, "health", "--service", "coffre.v1.Records"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "SERVING");
    drop(s);
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = Command::new(bin())
        .args(["--addr", &format!("http://{free}"), "health"])
        .output()
        .unwrap();
    assert!(!down.status.success());
    let err = String::from_utf8_lossy(&down.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// The documents point at things that exist: every test the compliance map
/// names, and every runbook anchor an alert rule names.
#[test]
fn documents_name_only_tests_and_sections_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let map = std::fs::read_to_string(root.join("docs/compliance.md")).unwrap();
    let mut named = 0;
    for cite in map.split('`').skip(1).step_by(2) {
        let Some((file, test)) = cite.split_once("::") else {
            continue;
        };
        if !file.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') || test.contains(':') {
            continue;
        }
        let Ok(src) = std::fs::read_to_string(root.join("tests").join(format!("{file}.rs"))) else {
            continue;
        };
        named += 1;
        assert!(
            src.contains(&format!("fn {test}(")),
            "docs/compliance.md names {cite}, which does not exist"
        );
    }
    assert!(named >= 30, "{named}");
    // Runbook anchors of the alert rules are headings of operations.md.
    let ops = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let anchors: BTreeSet<String> = ops
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                .collect::<String>()
                .replace(' ', "-")
        })
        .collect();
    let rules = std::fs::read_to_string(deploy("prometheus/coffre-rules.yml")).unwrap();
    for line in rules.lines().filter(|l| l.contains("runbook:")) {
        let anchor = line.split('#').nth(1).unwrap().trim_end_matches('"');
        assert!(
            anchors.contains(anchor),
            "runbook #{anchor} is no heading of docs/operations.md"
        );
    }
}
