#!/usr/bin/env bash
# The main job with a competing load on one of the two cores for part of the run, then a quiet re-measurement.
set -u
cd /work/main
DB=/tmp/i16/load.db; rm -f $DB
start=$(date +%s)
python -m harness.search --objective latency --storage $DB --no-plot > /tmp/i16/load_main.log 2>&1 &
MAIN=$!
sleep 60
timeout 150 taskset -c 1 python -c "while True: pass" &
LOAD=$!
wait $MAIN; echo "main rc $? wall $(( $(date +%s) - start )) s" >> /tmp/i16/load_main.log
wait $LOAD 2>/dev/null
python -m harness.analysis reproduce --storage $DB --study pixel-base-tiny-16px-latency+fvd-tpe-seed0 --neighbours 40 > /tmp/i16/load_repro.log 2>/tmp/i16/load_repro.err
echo "repro rc $?" >> /tmp/i16/load_repro.log
