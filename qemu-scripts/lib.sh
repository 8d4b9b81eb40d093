# Shared helpers of the qemu-scripts: a private apt for a newer Debian suite, and unpacking.
# Sourced, not run. Nothing here touches the system's apt or dpkg state.
#
# VGPU_EMU_CACHE   cache directory (default: ${XDG_CACHE_HOME:-$HOME/.cache}/vgpu-emu); holds
#                  downloads and unpacked trees, outside the repository
# VGPU_EMU_SUITE   Debian suite to take QEMU and the guest from (default: trixie)

set -euo pipefail

CACHE="${VGPU_EMU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vgpu-emu}"
SUITE="${VGPU_EMU_SUITE:-trixie}"
APTDIR="$CACHE/apt-$SUITE"

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The Debian archive this machine already uses (its apt sources), so no host name is written
# anywhere in the project.
archive_url() {
    local url=""
    if [ -n "${VGPU_EMU_DEBIAN_MIRROR:-}" ]; then
        echo "$VGPU_EMU_DEBIAN_MIRROR"; return
    fi
    # deb822 sources: the first URIs of a stanza whose Suites are not -security.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        url=$(awk '
            /^[[:space:]]*$/ { if (uri != "" && suites !~ /security/ && suites ~ /[a-z]/) { print uri; exit } uri=""; suites=""; next }
            /^URIs:/ { uri=$2 }
            /^Suites:/ { $1=""; suites=$0 }
            END { if (uri != "" && suites !~ /security/) print uri }' "$f" | grep -E '/debian/?$' | head -n1 || true)
        [ -n "$url" ] && break
    done
    if [ -z "$url" ] && [ -r /etc/apt/sources.list ]; then
        url=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { print $i; exit } }' /etc/apt/sources.list | head -n1)
    fi
    [ -n "$url" ] || die "no Debian archive found in /etc/apt/sources.list{,.d}; set VGPU_EMU_DEBIAN_MIRROR"
    echo "${url%/}"
}

APT_OPTS=()
# Sets up the private apt for $SUITE (+ backports) and refreshes its lists once a day.
private_apt() {
    local url keyring
    url=$(archive_url)
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -r "$keyring" ] || die "$keyring is missing (package debian-archive-keyring)"
    mkdir -p "$APTDIR"/{lists/partial,archives/partial,cache,etc/sources.list.d,etc/preferences.d,etc/apt.conf.d}
    # One user of the private apt at a time (parallel guest boots), held until the script ends.
    exec 8>"$APTDIR/.lock"
    flock 8
    [ -e "$APTDIR/status" ] || : > "$APTDIR/status"
    cat > "$APTDIR/etc/sources.list" <<SOURCES
deb [signed-by=$keyring] $url $SUITE main
deb [signed-by=$keyring] $url $SUITE-backports main
SOURCES
    APT_OPTS=(
        -o "Dir::Etc::SourceList=$APTDIR/etc/sources.list"
        -o "Dir::Etc::SourceParts=$APTDIR/etc/sources.list.d"
        -o "Dir::Etc::Preferences=$APTDIR/etc/preferences"
        -o "Dir::Etc::PreferencesParts=$APTDIR/etc/preferences.d"
        -o "Dir::State=$APTDIR"
        -o "Dir::State::Lists=$APTDIR/lists"
        -o "Dir::State::status=$APTDIR/status"
        -o "Dir::Cache=$APTDIR/cache"
        -o "Dir::Cache::Archives=$APTDIR/archives"
        -o "APT::Architecture=amd64"
        -o "APT::Install-Recommends=false"
        -o "Debug::NoLocking=true"
        -o "APT::Sandbox::User=root"
        -o "quiet=1"
    )
    # Refresh once a day. (apt gives list files the archive's timestamps, so their own mtime
    # says nothing about when they were fetched: keep a stamp of our own.)
    if [ -z "$(find "$APTDIR/.updated" -mtime -1 2>/dev/null)" ]; then
        log "refreshing package lists of $SUITE and $SUITE-backports"
        apt-get "${APT_OPTS[@]}" update > "$APTDIR/update.log" 2>&1 || { cat "$APTDIR/update.log" >&2; die "apt-get update of $SUITE failed"; }
        touch "$APTDIR/.updated"
    fi
}

# Downloads PACKAGES... with their whole dependency closure (as if installed on an empty system)
# into the private archive cache; prints the .deb paths.
fetch_closure() {
    apt-get "${APT_OPTS[@]}" -y --download-only install "$@" > "$APTDIR/fetch.log" 2>&1 \
        || { cat "$APTDIR/fetch.log" >&2; die "cannot download $*"; }
}

# The .deb file names of the whole closure of PACKAGES (apt-get install options first, e.g.
# -t RELEASE), as apt would install them on the private status, whether or not they are in the
# archive cache already (--print-uris leaves out what is cached, so a tree unpacked from it
# would miss packages another provisioning downloaded).
closure_files() {
    local plan files
    plan=$(apt-get "${APT_OPTS[@]}" -s install "$@" 2>&1) \
        || { printf '%s\n' "$plan" >&2; die "cannot resolve $*"; }
    files=$(sed -nE 's/^Inst ([^ ]+) (\[[^]]*\] )?\(([^ ]+) .*\[([a-z0-9]+)\]\)( \[.*\])?$/\1_\3_\4.deb/p' <<<"$plan" | sed 's/:/%3a/')
    [ -n "$files" ] && [ "$(wc -l <<<"$files")" = "$(grep -c '^Inst ' <<<"$plan")" ] \
        || { printf '%s\n' "$plan" >&2; die "cannot read apt's plan for $*"; }
    printf '%s\n' "$files"
}

# Downloads exactly PACKAGES (no dependencies) into the private archive cache.
fetch_only() {
    (cd "$APTDIR/archives" && apt-get "${APT_OPTS[@]}" download "$@" > "$APTDIR/fetch.log" 2>&1) \
        || { cat "$APTDIR/fetch.log" >&2; die "cannot download $*"; }
}

# The version apt would pick of PACKAGE.
candidate() {
    apt-cache "${APT_OPTS[@]}" policy "$1" | awk '/Candidate:/ { print $2 }'
}
