#!/usr/bin/env bash
# Checks that the README and docs/*.md point only at things that exist:
#   - every relative Markdown link [text](target) resolves to a file or
#     folder, and its #anchor (if any) to a heading of the target page;
#   - every repository path they name, in backticks, code blocks or prose
#     (src/..., tests/..., sql/..., bench/..., docs/..., migrations/...,
#     scripts/..., clients/..., ops/..., .ci/...), exists; a path with * must match
#     something;
#   - every bare file name in backticks (`openapi.yaml`, `Dockerfile`,
#     `V1__relay.sql`, `latency-*.svg`) exists somewhere in the repository.
# Prints each broken one as file:line: what, and exits 1 if there are any.
#
# Usage: scripts/check-doc-links.sh [FILE.md ...]   (default: README.md docs/*.md)
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob

if (($#)); then files=("$@"); else files=(README.md docs/*.md); fi

# Named in the docs but kept outside this repository: none. The docs point
# only at what a clone holds (the contract included: docs/how-it-works.md).
external_names=" "

# Every file of the repository (for bare names), without build output.
repo_files=$(find . -path ./target -prune -o -path ./.git -prune -o -type f -print | sed 's|.*/||' | sort -u)

broken=0
report() { # file line message
    echo "$1:$2: $3"
    broken=$((broken + 1))
}

# The lines of a Markdown file outside fenced code blocks, as "N:text".
prose_lines() {
    awk '/^[[:space:]]*```/ { fenced = !fenced; next } !fenced { print NR ":" $0 }' "$1"
}

# GitHub's anchors for the headings of a Markdown file, one per line.
anchors_of() {
    awk '/^[[:space:]]*```/ { fenced = !fenced; next } !fenced && /^#+ / { print }' "$1" |
        sed -E 's/^#+ +//; s/ +#*$//' |
        tr '[:upper:]' '[:lower:]' |
        sed -E 's/[^a-z0-9 _-]//g; s/ /-/g'
}

exists() { # path (may hold a * glob)
    local p=$1 matches
    if [[ $p == *'*'* ]]; then
        # shellcheck disable=SC2206 # the glob is the point
        matches=($p)
        ((${#matches[@]} > 0))
    else
        [[ -e $p ]]
    fi
}

in_repo() { # bare file name (may hold a * glob)
    local f
    while read -r f; do
        # shellcheck disable=SC2053 # a name may be a glob
        [[ $f == $1 ]] && return 0
    done <<<"$repo_files"
    return 1
}

for md in "${files[@]}"; do
    [[ -f $md ]] || { report "$md" 0 "no such file"; continue; }
    dir=$(dirname "$md")

    # 1. Relative links and their anchors.
    while IFS=: read -r line target; do
        case $target in
            *://* | mailto:*) continue ;;
        esac
        path=${target%%#*}
        anchor=
        [[ $target == *'#'* ]] && anchor=${target#*#}
        if [[ -z $path ]]; then
            resolved=$md
        else
            resolved=$dir/$path
        fi
        if ! exists "$resolved"; then
            report "$md" "$line" "link to $target: no such file or folder"
            continue
        fi
        if [[ -n $anchor ]]; then
            if [[ $resolved != *.md || ! -f $resolved ]] ||
                ! anchors_of "$resolved" | grep -qxF -- "$anchor"; then
                report "$md" "$line" "link to $target: no heading #$anchor in $resolved"
            fi
        fi
    done < <(prose_lines "$md" |
        grep -oE '^[0-9]+:|\]\([^)[:space:]]+\)' |
        awk '/^[0-9]+:$/ { n = substr($0, 1, length($0) - 1); next } { print n ":" substr($0, 3, length($0) - 3) }')

    # 2. Repository paths, anywhere but in link targets (checked above),
    #    URLs and other paths.
    while IFS=: read -r line path; do
        path=${path%%[.,;:)]}
        path=${path%%[.,;:)]}
        exists "$path" || report "$md" "$line" "path $path: no such file or folder"
    done < <(sed -E 's/\]\([^)[:space:]]*\)/]()/g' "$md" | grep -noE '(^|[^A-Za-z0-9_./~-])(src|tests|sql|bench|docs|migrations|scripts|clients|ops|\.ci)/[A-Za-z0-9_./*-]*' |
        sed -E 's/^([0-9]+):[^A-Za-z.]*/\1:/')

    # 3. Bare file names in backticks.
    while IFS=: read -r line name; do
        [[ $external_names == *" $name "* ]] && continue
        in_repo "$name" || report "$md" "$line" "file $name: not in the repository"
    done < <(grep -noE '`[A-Za-z0-9_*-][A-Za-z0-9_.*-]*\.(md|yaml|yml|toml|lock|sh|py|rs|sql|html|svg|json)`|`Dockerfile`' "$md" |
        tr -d '`')
done

if ((broken)); then
    echo "check-doc-links: $broken broken link(s) or path(s) in ${files[*]}" >&2
    exit 1
fi
echo "check-doc-links: every link and path in ${#files[@]} files resolves"
