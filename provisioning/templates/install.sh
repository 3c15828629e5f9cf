#!/bin/sh
# Install lepton-edge from this bundle (made by `lepton provision`).
#
#   sudo ./install.sh                    # Raspberry Pi OS bookworm, JetPack 6, Debian/Ubuntu
#
# It creates a virtualenv under /opt/lepton/venv and installs the package
# into it, puts the config under /etc/lepton and the credentials (TLS key,
# certificate, CA) under /etc/lepton/credentials (0700, key 0600; the service
# reads them through systemd LoadCredential=), installs the systemd unit,
# checks the config and enables and starts the service.
# Running it again upgrades the package and replaces config and credentials.
set -eu
umask 077   # nothing this script creates is readable by others unless it says so

HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=${DESTDIR:-}
PYTHON=${PYTHON:-python3}
PACKAGE=""
PIP_ARGS=""
VENV_ARGS=""
SYSTEMCTL=auto
JETSON=auto

usage() {
    cat <<'EOF'
usage: install.sh [options]
  --prefix DIR             install under DIR instead of / (staging, tests; also $DESTDIR)
  --package SPEC           what pip installs: a wheel, a directory, a requirement
                           (default: the *.whl in this bundle, else "lepton-edge")
  --pip-args "ARGS"        extra pip arguments (e.g. "--no-index --find-links /media/usb")
  --python PYTHON          interpreter for the virtualenv (default python3; needs >= 3.10)
  --system-site-packages   let the virtualenv see system packages (JetPack's OpenCV, TensorRT)
  --jetson | --no-jetson   install the Jetson drop-in (default: when /etc/nv_tegra_release exists)
  --no-systemctl           do not run systemctl (also skipped when systemd is not running
                           or with --prefix)
  -h, --help               this text
EOF
}

die() { echo "install.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
        --package) [ $# -ge 2 ] || die "--package needs a value"; PACKAGE=$2; shift 2 ;;
        --pip-args) [ $# -ge 2 ] || die "--pip-args needs a value"; PIP_ARGS=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || die "--python needs a value"; PYTHON=$2; shift 2 ;;
        --system-site-packages) VENV_ARGS="--system-site-packages"; shift ;;
        --jetson) JETSON=yes; shift ;;
        --no-jetson) JETSON=no; shift ;;
        --no-systemctl) SYSTEMCTL=no; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

case "$PREFIX" in
    ""|/*) ;;
    *) PREFIX=$(pwd)/$PREFIX ;;  # the paths written into ROLE.local.toml work from anywhere
esac

if [ -f "$HERE/agent.toml" ]; then
    ROLE=agent; KEY=device.key; CERT=device.crt
elif [ -f "$HERE/coordinator.toml" ]; then
    ROLE=coordinator; KEY=coordinator.key; CERT=coordinator.crt
else
    die "no agent.toml or coordinator.toml next to install.sh: run it from an unpacked bundle"
fi
UNIT=lepton-$ROLE.service
for f in "$ROLE.toml" models.pub "$UNIT" credentials/ca.crt "credentials/$CERT" "credentials/$KEY"; do
    [ -f "$HERE/$f" ] || die "bundle is missing $f"
done
if [ -z "$PREFIX" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo ./install.sh), or stage with --prefix DIR"
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || die "$PYTHON is missing or older than 3.10 (Raspberry Pi OS bookworm has 3.11, JetPack 6 has 3.10)"
if [ -z "$PACKAGE" ]; then
    PACKAGE=lepton-edge
    for whl in "$HERE"/*.whl; do [ -f "$whl" ] && PACKAGE=$whl; done
fi

VENV=$PREFIX/opt/lepton/venv
ETC=$PREFIX/etc/lepton
UNITDIR=$PREFIX/etc/systemd/system

echo "==> virtualenv $VENV"
install -d -m 0755 "$PREFIX/opt/lepton"
[ -x "$VENV/bin/python" ] || (umask 022 && "$PYTHON" -m venv $VENV_ARGS "$VENV")
echo "==> pip install $PACKAGE"
# shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
(umask 022 && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PIP_ARGS "$PACKAGE")

echo "==> config $ETC"
install -d -m 0755 "$ETC"
install -m 0644 "$HERE/$ROLE.toml" "$ETC/$ROLE.toml"
install -m 0644 "$HERE/models.pub" "$ETC/models.pub"
if [ -f "$HERE/zoo.pub" ]; then install -m 0644 "$HERE/zoo.pub" "$ETC/zoo.pub"; fi
install -d -m 0700 "$ETC/credentials"
install -m 0644 "$HERE/credentials/ca.crt" "$HERE/credentials/$CERT" "$ETC/credentials/"
install -m 0600 "$HERE/credentials/$KEY" "$ETC/credentials/$KEY"

echo "==> unit $UNITDIR/$UNIT"
install -d -m 0755 "$UNITDIR"
install -m 0644 "$HERE/$UNIT" "$UNITDIR/$UNIT"
if [ "$JETSON" = auto ]; then
    JETSON=no; [ -f /etc/nv_tegra_release ] && JETSON=yes
fi
if [ "$ROLE" = agent ] && [ "$JETSON" = yes ]; then
    [ -f "$HERE/jetson.conf" ] || die "bundle is missing jetson.conf"
    install -d -m 0755 "$UNITDIR/$UNIT.d"
    install -m 0644 "$HERE/jetson.conf" "$UNITDIR/$UNIT.d/jetson.conf"
    echo "    Jetson drop-in installed: $UNITDIR/$UNIT.d/jetson.conf"
fi

echo "==> check config"
# The service reads its credentials from /run/credentials/$UNIT, which exists
# only while it runs: check a copy that points at the installed files instead
# (and at $ETC and $PREFIX/var/lib when staging under --prefix: a staging user
# need not be able to write /var/lib, which the service's StateDirectory= makes).
# With --prefix that copy is kept as $ROLE.local.toml, with the agent's state
# (outbox, model cache) under $PREFIX/var/lib/lepton too: the command printed
# at the end runs it by hand on this machine, to try a fleet before deploying.
CHECK=$(mktemp "${TMPDIR:-/tmp}/lepton-check.XXXXXX")
KEYS=$(mktemp "${TMPDIR:-/tmp}/lepton-keys.XXXXXX")
trap 'rm -f "$CHECK" "$KEYS"' EXIT
sed -e "s#/run/credentials/$UNIT#$ETC/credentials#g" -e "s#\"/etc/lepton/#\"$ETC/#g" \
    -e "s#\"/var/lib/lepton#\"$PREFIX/var/lib/lepton#g" "$ETC/$ROLE.toml" > "$CHECK"
if [ "$ROLE" = agent ] && [ -n "$PREFIX" ]; then
    # The keys the config leaves at their /var/lib defaults: "section.key=value" lines, set in the copy.
    "$VENV/bin/python" - "$CHECK" "$PREFIX/var/lib/lepton" > "$KEYS" <<'PY'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10 (JetPack 6): the package depends on tomli there
    import tomli as tomllib
config, state = tomllib.load(open(sys.argv[1], "rb")), sys.argv[2]
for section, key, value in (("outbox", "path", "outbox.db"), ("models", "cache_dir", "models")):
    if key not in config.get(section, {}):
        print(f'{section}.{key}="{state}/{value}"')
PY
    while IFS= read -r line; do
        section=${line%%.*}; rest=${line#*.}
        if grep -q "^\[$section\]" "$CHECK"; then
            sed -i "/^\[$section\]/a ${rest%%=*} = ${rest#*=}" "$CHECK"
        else
            printf '\n[%s]\n%s = %s\n' "$section" "${rest%%=*}" "${rest#*=}" >> "$CHECK"
        fi
    done < "$KEYS"
fi
"$VENV/bin/lepton" "$ROLE" --check-config "$CHECK"
LOCAL=""
if [ -n "$PREFIX" ]; then
    LOCAL=$ETC/$ROLE.local.toml
    install -m 0600 "$CHECK" "$LOCAL"
    if [ "$ROLE" = agent ]; then install -d -m 0700 "$PREFIX/var/lib/lepton"; fi
    if [ "$ROLE" = coordinator ]; then install -d -m 0700 "$PREFIX/var/lib/lepton-coordinator"; fi
fi

if [ "$SYSTEMCTL" = auto ]; then
    SYSTEMCTL=no
    if [ -z "$PREFIX" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        SYSTEMCTL=yes
    fi
fi
if [ "$SYSTEMCTL" = yes ]; then
    echo "==> systemctl enable --now $UNIT"
    systemctl daemon-reload
    systemctl enable "$UNIT"
    systemctl restart "$UNIT"
    systemctl --no-pager --lines=0 status "$UNIT" || true
else
    echo "==> systemctl skipped; on the target run: systemctl daemon-reload && systemctl enable --now $UNIT"
fi
echo "installed lepton $ROLE"
if [ -n "$LOCAL" ]; then
    echo "to run it on this machine, not as a service: $VENV/bin/lepton $ROLE --config $LOCAL"
fi
