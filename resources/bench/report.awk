# Turns the samples of resources/bench/run.sh into BENCHMARKS.md and
# BENCHMARKS.json (POSIX awk: Debian's default awk is mawk).
#
# Input files, in order: metrics.tsv (id, title, unit, better, baseline,
# goal), samples.tsv (metric, monitor, value; monitor "na" = not available),
# notes.txt (one note a line). Variables: -v md=PATH -v json=PATH; the run's
# facts come from the environment (see the export in run.sh).
#
# Goals: space-separated clauses, all must hold for "goal met":
#   floor<=X   kiln median / floor median <= X
#   qemu<X     kiln median / QEMU median < X    (qemu<=X likewise)
#   qemu>=X    kiln median / QEMU median >= X   (metrics where higher is better)
#   abs<=X     kiln median <= X
# Clauses are judged on medians; when kiln's min–max range overlaps that of
# the baseline a clause names, the result says the comparison is within noise.
# Against QEMU, overlapping ranges are a tie, never "ahead" or "behind". A
# cell, comparison or goal resting on a single sample says so.
# Metrics named bootpath_* (kiln alone, one boot-path choice changed at a
# time) and security_* (kiln alone, a security layer turned off) go to a
# table of their own each, as ratios to their baseline metric. Metrics named
# oci_* (the OCI runtime: podman with runc, crun or kiln-oci, whose samples
# are under "kiln") go to a table of their own, kiln-oci against runc.

BEGIN {
    FS = "\t"
    nmon = split("kiln qemu floor floor_irqchip runc crun", MON, " ")
    MONNAME["kiln"] = "kiln"; MONNAME["qemu"] = "QEMU"
    MONNAME["floor"] = "floor"; MONNAME["floor_irqchip"] = "floor + irqchip"
    MONNAME["runc"] = "runc"; MONNAME["crun"] = "crun"
    file = 0
}

FNR == 1 { file++ }

file == 1 {
    if ($0 ~ /^#/ || $0 == "") next
    nmet++
    ID[nmet] = $1; TITLE[$1] = $2; UNIT[$1] = $3; BETTER[$1] = $4
    BASE[$1] = $5; GOAL[$1] = $6
    next
}

file == 2 {
    if ($2 == "na") { NA[$1] = 1; next }
    k = $1 SUBSEP $2
    N[k]++
    V[k, N[k]] = $3 + 0
    if (N[k] == 1) RAW[k] = $3
    else RAW[k] = RAW[k] ", " $3
    next
}

file == 3 {
    if ($0 != "") NOTE[++nnotes] = $0
}

function stats(k,    n, i, j, t, a) {
    n = N[k]
    for (i = 1; i <= n; i++) a[i] = V[k, i]
    for (i = 2; i <= n; i++) {
        t = a[i]
        for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]
        a[j + 1] = t
    }
    MIN[k] = a[1]; MAX[k] = a[n]
    MED[k] = (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}

function fmt(x) {
    if (x == int(x) && (x >= 100 || x <= -100)) return sprintf("%d", x)
    if (x >= 100 || x <= -100) return sprintf("%.0f", x)
    if (x >= 10 || x <= -10) return sprintf("%.1f", x)
    return sprintf("%.2f", x)
}

function cell(id, mon,    k) {
    k = id SUBSEP mon
    if (!(k in N)) return "—"
    if (N[k] == 1) return fmt(MED[k]) " (1 sample)"
    return fmt(MED[k]) " (" fmt(MIN[k]) "–" fmt(MAX[k]) ")"
}

# True when kiln or a baseline named in the goal clauses c[1..n] has a
# single sample: no noise estimate.
function single_sample(id, c, n,    i, name, kb) {
    if (N[id SUBSEP "kiln"] == 1) return 1
    for (i = 1; i <= n; i++) {
        name = c[i]; sub(/[<>=].*/, "", name)
        if (name == "abs") continue
        kb = id SUBSEP name
        if ((kb in N) && N[kb] == 1) return 1
    }
    return 0
}

function has(id, mon) { return (id SUBSEP mon) in N }

function ratio(id, mon) {
    if (!has(id, "kiln") || !has(id, mon) || MED[id SUBSEP mon] <= 0 || MED[id SUBSEP "kiln"] < 0) return ""
    return MED[id SUBSEP "kiln"] / MED[id SUBSEP mon]
}

# "goal met" / "goal NOT met (...)" / "" when the metric has no goal.
function goal_status(id,    n, c, i, parts, op, lim, val, ok, all, why, name, noise) {
    if (GOAL[id] == "-" || GOAL[id] == "") return ""
    if (!has(id, "kiln")) return "goal not measured"
    n = split(GOAL[id], c, " ")
    all = 1; why = ""
    for (i = 1; i <= n; i++) {
        if (match(c[i], /<=|>=|</) == 0) continue
        name = substr(c[i], 1, RSTART - 1); op = substr(c[i], RSTART, RLENGTH)
        lim = substr(c[i], RSTART + RLENGTH) + 0
        if (name == "abs") val = MED[id SUBSEP "kiln"]
        else { val = ratio(id, name); if (val == "") { why = why " no " name " result;"; continue } }
        ok = (op == "<=") ? (val <= lim) : (op == ">=") ? (val >= lim) : (val < lim)
        if (!ok) {
            all = 0
            why = why sprintf(" %s %s %s;", (name == "abs" ? "kiln" : "kiln/" MONNAME[name]), (op == "<=" ? ">" : op == ">=" ? "<" : ">="), fmt(lim))
        }
    }
    sub(/;$/, "", why)
    noise = ""
    if (noise_overlap(id, c, n)) noise = " (on medians; kiln's min–max overlaps the baseline's: within noise)"
    else if (single_sample(id, c, n)) noise = " (single sample: no noise estimate)"
    if (all && why == "") return "goal met" noise
    if (all) return "goal partly measured:" why noise
    return "**goal NOT met**:" why noise
}

function goal_text(g, unit,    n, c, i, out, t) {
    if (g == "-" || g == "") return ""
    n = split(g, c, " ")
    out = ""
    for (i = 1; i <= n; i++) {
        t = c[i]
        if (t == "qemu<1") t = "kiln < QEMU"
        else if (t ~ /^floor<=/) t = "kiln/floor ≤ " substr(t, 8)
        else if (t ~ /^qemu<=/) t = "kiln/QEMU ≤ " substr(t, 7)
        else if (t == "qemu>=1") t = "kiln ≥ QEMU"
        else if (t ~ /^qemu>=/) t = "kiln/QEMU ≥ " substr(t, 7)
        else if (t ~ /^abs<=/) t = "≤ " substr(t, 6) " " unit
        out = out (out == "" ? "" : ", ") t
    }
    return out
}

# True when kiln's min–max range overlaps that of a floor/QEMU baseline
# named in the goal clauses c[1..n] (both measured more than once).
function noise_overlap(id, c, n,    i, name, kk, kb) {
    kk = id SUBSEP "kiln"
    if (N[kk] < 2) return 0
    for (i = 1; i <= n; i++) {
        name = c[i]; sub(/[<>=].*/, "", name)
        if (name == "abs") continue
        kb = id SUBSEP name
        if (!(kb in N) || N[kb] < 2) continue
        if (MIN[kk] <= MAX[kb] && MIN[kb] <= MAX[kk]) return 1
    }
    return 0
}

# Compared with QEMU, in the metric's direction: a tie when the min–max
# ranges overlap (both measured more than once) or the medians are equal.
function vs_qemu(id,    r, kk, kq, single, ahead) {
    r = ratio(id, "qemu")
    if (r == "") return ""
    kk = id SUBSEP "kiln"; kq = id SUBSEP "qemu"
    single = (N[kk] < 2 || N[kq] < 2) ? " (single sample: no noise estimate)" : ""
    if (single == "" && MIN[kk] <= MAX[kq] && MIN[kq] <= MAX[kk])
        return "tie with QEMU (min–max ranges overlap)"
    if (r == 1) return "tie with QEMU (equal medians)" single
    ahead = (BETTER[id] == "higher") ? (r > 1) : (r < 1)
    return (ahead ? "kiln ahead of QEMU" : "**kiln behind QEMU**") single
}

function jesc(s) {
    gsub(/\*\*/, "", s)
    gsub(/\\/, "\\\\\\\\", s); gsub(/"/, "\\\"", s); gsub(/\t/, " ", s)
    return "\"" s "\""
}

function jnum(x) { return (x == "") ? "null" : sprintf("%.6g", x) }

END {
    for (k in N) stats(k)
    E["date"] = ENVIRON["run_date"]; E["cpu"] = ENVIRON["cpu_model"]
    loadnote = ""
    split(ENVIRON["load_start"], ls, " ")
    if (ls[1] + 0 > ENVIRON["cpu_count"] * 0.5)
        loadnote = sprintf("The host was busy when the run started (load average %s on %s CPUs): these are development numbers, not a measurement.", ENVIRON["load_start"], ENVIRON["cpu_count"])

    # ---------------------------------------------------------- Markdown
    print "# kiln benchmarks" > md
    print "" > md
    print "Generated by `resources/bench/run.sh" (ENVIRON["quick"] == 1 ? " --quick" : "") (ENVIRON["only"] != "exits,startup,security,boot,bootpath,command,snapshot,exec,disk,net,fs,oci" ? " --only " ENVIRON["only"] : "") "`; the method is in resources/bench/README.md." > md
    print "" > md
    print "| | |" > md
    print "|---|---|" > md
    print "| date (UTC) | " ENVIRON["run_date"] " |" > md
    print "| host CPU | " ENVIRON["cpu_model"] ", " ENVIRON["cpu_count"] " CPUs |" > md
    print "| KVM | " ENVIRON["kvm_detail"] " |" > md
    print "| kiln revision | " ENVIRON["kiln_rev"] " (" ENVIRON["kiln_build"] " build) |" > md
    print "| QEMU | " ENVIRON["qemu_version"] " |" > md
    print "| repetitions | " ENVIRON["reps_boot"] " per boot benchmark (boot-path choices: " ENVIRON["reps_bootpath"] "), " ENVIRON["reps"] " for the rest; " ENVIRON["exit_n"] " exits per exit-cost run |" > md
    print "| load average | " ENVIRON["load_start"] " at start, " ENVIRON["load_end"] " at end; run took " ENVIRON["elapsed"] " s |" > md
    print "" > md
    if (loadnote != "") { print "> " loadnote > md; print "" > md }
    print "Cells: median (min–max) over the repetitions. floor = `kvm-floor`, a bare C loop around KVM_RUN (no irqchip); floor + irqchip = the same with the in-kernel irqchip and PIT kiln creates (start-up rows use it)." > md
    print "" > md
    print "| benchmark | unit | kiln | QEMU | floor | floor + irqchip | kiln/floor | kiln/QEMU | goal | result |" > md
    print "|---|---|---|---|---|---|---|---|---|---|" > md
    for (i = 1; i <= nmet; i++) {
        id = ID[i]
        if (id ~ /^bootpath_/) { nboot += has(id, "kiln"); continue }
        if (id ~ /^security_/) { nsec += has(id, "kiln"); continue }
        if (id ~ /^snapshot_/) { nsnap += has(id, "kiln"); continue }
        if (id ~ /^fsroot_/) { nroot += has(id, "kiln"); continue }
        if (id ~ /^oci_/) { noci += has(id, "kiln") + has(id, "runc") + (id in NA); ncrun += has(id, "crun"); continue }
        if (!has(id, "kiln") && !has(id, "qemu") && !has(id, "floor") && !(id in NA)) continue
        if (id in NA && !has(id, "kiln")) {
            printf "| %s | %s | not available | | | | | | | |\n", TITLE[id], UNIT[id] > md
            continue
        }
        base = BASE[id]
        rf = ""
        if (base == "floor") {
            rf = ratio(id, id ~ /^startup|^tiny|^vms/ ? "floor_irqchip" : "floor")
            if (rf == "" ) rf = ratio(id, "floor")
        }
        rq = ratio(id, "qemu")
        gtxt = goal_text(GOAL[id], UNIT[id])
        res = goal_status(id); vq = vs_qemu(id)
        if (res != "" && vq != "") res = res "; " vq
        else if (res == "") res = vq
        printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", TITLE[id], UNIT[id],
            cell(id, "kiln"), cell(id, "qemu"), cell(id, "floor"), cell(id, "floor_irqchip"),
            (rf == "" ? "" : fmt(rf)), (rq == "" ? "" : fmt(rq)), gtxt, res > md
    }
    print "" > md
    if (nboot > 0) {
        print "### Boot path choices (kiln alone)" > md
        print "" > md
        print "Boot to init (the marker from the benchmark initramfs's /init) with one choice changed at a time; the ratio is against kiln's default in the same run." > md
        print "" > md
        variant_table("^bootpath_", "boot path", "vs default", "(default)")
    }
    if (nsec > 0) {
        print "### Security layers (kiln alone)" > md
        print "" > md
        print "A tiny VM that exits at once, with the jail and the seccomp filters on (kiln's default) and each turned off; the ratio is against the default in the same run." > md
        print "" > md
        variant_table("^security_", "layers", "vs default", "(default)")
    }
    if (nsnap > 0) {
        print "### Snapshots (kiln alone)" > md
        print "" > md
        print "One `kiln snapshot create` of the busybox root booted to kiln's agent (256 MiB guest), then `kiln run --from` copies of it; the ratio is against the same command booting, in the same run." > md
        print "" > md
        variant_table("^snapshot_", "snapshot", "vs booting", "")
    }
    if (nroot > 0) {
        print "### Shared vs packed root (kiln alone)" > md
        print "" > md
        print "`kiln run --kernel vmlinux --rootfs DIR -- echo hi` to its first line, the busybox root padded with random data to the size, packed into the initramfs (`DIR`) or shared over virtio-fs (`DIR,share`); the ratio is against the packed root of the same size, in the same run. QEMU has no counterpart of kiln's packing, so kiln runs alone here." > md
        print "" > md
        variant_table("^fsroot_", "root", "vs packed", "")
    }
    if (noci > 0) {
        print "### OCI runtime: kiln-oci vs runc" > md
        print "" > md
        print "podman with each runtime in turn, the same image (busybox, `podman import`) and podman options but `--runtime` (kiln-oci: one micro-VM per container, its kernel by `--runtime-flag kernel=`); wall time of the podman command. What the host has of crun and krun is in the notes." > md
        print "" > md
        oci_table()
    }
    if (nnotes > 0) {
        print "## Notes from this run" > md
        print "" > md
        for (i = 1; i <= nnotes; i++) print "- " NOTE[i] > md
        print "" > md
    }
    close(md)

    # -------------------------------------------------------------- JSON
    print "{" > json
    print "  \"date\": " jesc(ENVIRON["run_date"]) "," > json
    print "  \"host\": {\"cpu\": " jesc(ENVIRON["cpu_model"]) ", \"cpus\": " (ENVIRON["cpu_count"] + 0) ", \"kvm\": " jesc(ENVIRON["kvm_flavour"]) ", \"kvm_detail\": " jesc(ENVIRON["kvm_detail"]) ", \"load_average_start\": " jesc(ENVIRON["load_start"]) ", \"load_average_end\": " jesc(ENVIRON["load_end"]) "}," > json
    print "  \"kiln_revision\": " jesc(ENVIRON["kiln_rev"]) "," > json
    print "  \"kiln_build\": " jesc(ENVIRON["kiln_build"]) "," > json
    print "  \"qemu\": " jesc(ENVIRON["qemu_version"]) "," > json
    print "  \"quick\": " (ENVIRON["quick"] == 1 ? "true" : "false") "," > json
    print "  \"sections\": " jesc(ENVIRON["only"]) "," > json
    print "  \"repetitions\": {\"boot\": " (ENVIRON["reps_boot"] + 0) ", \"bootpath\": " (ENVIRON["reps_bootpath"] + 0) ", \"other\": " (ENVIRON["reps"] + 0) "}," > json
    print "  \"exits_per_run\": " (ENVIRON["exit_n"] + 0) "," > json
    print "  \"elapsed_s\": " (ENVIRON["elapsed"] + 0) "," > json
    print "  \"results\": [" > json
    first = 1
    for (i = 1; i <= nmet; i++) {
        id = ID[i]
        if (!has(id, "kiln") && !has(id, "qemu") && !has(id, "floor") && !has(id, "runc") && !(id in NA)) continue
        printf "%s    {\"id\": %s, \"title\": %s, \"unit\": %s, \"better\": %s, \"goal\": %s,\n", (first ? "" : ",\n"),
            jesc(id), jesc(TITLE[id]), jesc(UNIT[id]), jesc(BETTER[id]), (GOAL[id] == "-" ? "null" : jesc(GOAL[id])) > json
        first = 0
        if (id in NA && !has(id, "kiln")) {
            printf "     \"available\": false, \"monitors\": {}}" > json
            continue
        }
        printf "     \"available\": true, \"goal_status\": %s, \"kiln_vs_qemu\": %s,\n", jesc(goal_status(id)), jesc(vs_qemu(id)) > json
        printf "     \"ratio_kiln_floor\": %s, \"ratio_kiln_floor_irqchip\": %s, \"ratio_kiln_qemu\": %s, \"ratio_kiln_runc\": %s,\n", jnum(ratio(id, "floor")), jnum(ratio(id, "floor_irqchip")), jnum(ratio(id, "qemu")), jnum(ratio(id, "runc")) > json
        printf "     \"monitors\": {" > json
        mfirst = 1
        for (m = 1; m <= nmon; m++) {
            k = id SUBSEP MON[m]
            if (!(k in N)) continue
            printf "%s\"%s\": {\"median\": %s, \"min\": %s, \"max\": %s, \"n\": %d, \"samples\": [%s]}", (mfirst ? "" : ", "),
                MON[m], jnum(MED[k]), jnum(MIN[k]), jnum(MAX[k]), N[k], RAW[k] > json
            mfirst = 0
        }
        printf "}}" > json
    }
    print "\n  ]," > json
    printf "  \"notes\": [" > json
    for (i = 1; i <= nnotes; i++) printf "%s\n    %s", (i > 1 ? "," : ""), jesc(NOTE[i]) > json
    print (nnotes ? "\n  ]" : "]") > json
    print "}" > json
    close(json)
}

# The kiln-alone rows whose id matches `pattern`, each as a ratio to its
# baseline row (the default), under a first column named `what`.
function variant_table(pattern, what, vs, plain,    i, id, b, r) {
    print "| " what " | unit | kiln | " vs " |" > md
    print "|---|---|---|---|" > md
    for (i = 1; i <= nmet; i++) {
        id = ID[i]
        if (id !~ pattern || !has(id, "kiln")) continue
        b = BASE[id]; r = ""
        if (b != "-" && has(b, "kiln") && MED[b SUBSEP "kiln"] > 0) r = fmt(MED[id SUBSEP "kiln"] / MED[b SUBSEP "kiln"]) "x"
        printf "| %s | %s | %s | %s |\n", TITLE[id], UNIT[id], cell(id, "kiln"), (b == "-" ? plain : r) > md
    }
    print "" > md
}

# The oci_* rows: kiln-oci (samples under "kiln"), runc, crun where it ran,
# and kiln-oci's median over runc's.
function oci_table(    i, id, r, crun) {
    crun = (ncrun > 0)
    print "| benchmark | unit | kiln-oci | runc |" (crun ? " crun |" : "") " kiln-oci/runc |" > md
    print "|---|---|---|---|" (crun ? "---|" : "") "---|" > md
    for (i = 1; i <= nmet; i++) {
        id = ID[i]
        if (id !~ /^oci_/) continue
        if (!has(id, "kiln") && !has(id, "runc")) {
            if (id in NA) printf "| %s | %s | not available | |%s |\n", TITLE[id], UNIT[id], (crun ? " |" : "") > md
            continue
        }
        r = ratio(id, "runc")
        printf "| %s | %s | %s | %s |%s %s |\n", TITLE[id], UNIT[id], cell(id, "kiln"), cell(id, "runc"),
            (crun ? " " cell(id, "crun") " |" : ""), (r == "" ? "" : fmt(r) "x") > md
    }
    print "" > md
}
