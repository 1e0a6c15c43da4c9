# entity-sync developer tasks. `make help` lists them.
#
# NSQ is embedded in the tests, so `make test` needs nothing but Go. The
# broker binaries (`make nsq`) are only for running a real local cluster.

# bash for /dev/tcp in `cluster` (waiting for nsqlookupd before starting
# nsqd, which would otherwise retry only after 15s).
SHELL := /bin/bash

GO    ?= go
BIN   := $(CURDIR)/bin
# Extra flags for the demo, e.g. make run ARGS='-nsqd 127.0.0.1:4150 -every 200ms'
ARGS  ?=

# Ports of the local cluster (`make cluster`); override to avoid clashes.
LOOKUPD_TCP  ?= 4160
LOOKUPD_HTTP ?= 4161
NSQD1_TCP    ?= 4150
NSQD1_HTTP   ?= 4151
NSQD2_TCP    ?= 4152
NSQD2_HTTP   ?= 4153

.PHONY: help todo run client test fmt vet nsq cluster clean

help:
	@echo 'make todo     run the todo demo: two servers, SQLite, NSQ between them (ARGS=... for flags)'
	@echo 'make run      run the basic demo server (in-process queue; ARGS=... for flags)'
	@echo 'make client   run the demo client (subscribes to items/100)'
	@echo 'make test     run every test: Go with the race detector, then test-js'
	@echo 'make test-js  run the JavaScript client tests (node + headless Chromium)'
	@echo 'make bench    run the benchmarks: go run ./bench, bench-queues, bench-collections, bench-cluster, bench-peer (about 6 min)'
	@echo 'make bench-queues  every queue: latency through it, notify throughput (about 20 s)'
	@echo 'make bench-collections  a 500-row collection: diff vs full per change, reconnects with and without resume (about 10 s)'
	@echo 'make bench-cluster  2 to 16 server processes per queue: notifications, fetches, CPU per change per server (about 2 min)'
	@echo 'make bench-peer  entity-sync vs Centrifuge on one key and many keys, the latency breakdown (about 4 min)'
	@echo 'make fmt      gofmt the tree'
	@echo 'make vet      go vet the module'
	@echo 'make nsq      build nsqd and nsqlookupd v1.3.0 into ./bin'
	@echo 'make cluster  run nsqlookupd + two nsqd locally until Ctrl-C'
	@echo 'make soak     3-minute soak run with faults (SOAK_DURATION=60s, SOAK_ARGS=...)'

todo:
	$(GO) run ./examples/todo $(ARGS)

run:
	$(GO) run ./examples/basic $(ARGS)

client:
	$(GO) run ./examples/basic/client $(ARGS)

# The same command the README and .ci/run use: every Go test with the race
# detector, then the JavaScript client's tests (test-js).
test:
	$(GO) test -race -count=1 ./...
	bash clients/js/scripts/test.sh

fmt:
	gofmt -w .

vet:
	$(GO) vet ./...

# The brokers come from their own module (tools/), which carries the go-svc
# replace that building nsq's apps needs; the library's go.mod stays clean.
nsq:
	cd tools && $(GO) build -o $(BIN)/ github.com/nsqio/nsq/apps/nsqd github.com/nsqio/nsq/apps/nsqlookupd

# A local NSQ cluster: one nsqlookupd and two nsqd registering with it, data
# in a temp dir that is removed on exit. Runs in the foreground; Ctrl-C stops
# the brokers. Broker logs go to files in the temp dir to keep the terminal
# free for the instructions.
cluster: nsq
	@set -eu; \
	dir=$$(mktemp -d "$${TMPDIR:-/tmp}/entity-sync-cluster.XXXXXX"); \
	mkdir -p "$$dir/nsqd1" "$$dir/nsqd2"; \
	pids=; \
	cleanup() { \
		[ -z "$$pids" ] || kill $$pids 2>/dev/null || true; \
		wait 2>/dev/null || true; \
		rm -rf "$$dir"; \
		echo 'cluster stopped'; \
	}; \
	trap cleanup EXIT; \
	trap 'exit 0' INT TERM; \
	"$(BIN)/nsqlookupd" --tcp-address=127.0.0.1:$(LOOKUPD_TCP) --http-address=127.0.0.1:$(LOOKUPD_HTTP) \
		--broadcast-address=127.0.0.1 >"$$dir/nsqlookupd.log" 2>&1 & pids="$$pids $$!"; \
	for _ in $$(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$(LOOKUPD_TCP)) 2>/dev/null && break; sleep 0.1; done; \
	"$(BIN)/nsqd" --tcp-address=127.0.0.1:$(NSQD1_TCP) --http-address=127.0.0.1:$(NSQD1_HTTP) \
		--broadcast-address=127.0.0.1 --lookupd-tcp-address=127.0.0.1:$(LOOKUPD_TCP) \
		--data-path="$$dir/nsqd1" >"$$dir/nsqd1.log" 2>&1 & pids="$$pids $$!"; \
	"$(BIN)/nsqd" --tcp-address=127.0.0.1:$(NSQD2_TCP) --http-address=127.0.0.1:$(NSQD2_HTTP) \
		--broadcast-address=127.0.0.1 --lookupd-tcp-address=127.0.0.1:$(LOOKUPD_TCP) \
		--data-path="$$dir/nsqd2" >"$$dir/nsqd2.log" 2>&1 & pids="$$pids $$!"; \
	echo "NSQ cluster running (logs in $$dir):"; \
	echo "  nsqlookupd  tcp 127.0.0.1:$(LOOKUPD_TCP)  http 127.0.0.1:$(LOOKUPD_HTTP)"; \
	echo "  nsqd 1      tcp 127.0.0.1:$(NSQD1_TCP)  http 127.0.0.1:$(NSQD1_HTTP)"; \
	echo "  nsqd 2      tcp 127.0.0.1:$(NSQD2_TCP)  http 127.0.0.1:$(NSQD2_HTTP)"; \
	echo; \
	echo "In other terminals, start demo instances that publish to their own nsqd,"; \
	echo "find every nsqd through nsqlookupd and share one item file (their"; \
	echo "\"database\"). The first changes item 100; the second only serves, so"; \
	echo "its client sees changes that crossed NSQ:"; \
	echo "  go run ./examples/basic -listen 127.0.0.1:8080 -nsqd 127.0.0.1:$(NSQD1_TCP) -lookupd 127.0.0.1:$(LOOKUPD_HTTP) -store $$dir/items.json"; \
	echo "  go run ./examples/basic -listen 127.0.0.1:8081 -nsqd 127.0.0.1:$(NSQD2_TCP) -lookupd 127.0.0.1:$(LOOKUPD_HTTP) -store $$dir/items.json -every 0"; \
	echo "  go run ./examples/basic/client -url ws://127.0.0.1:8081/ws/entity-sync/"; \
	echo; \
	echo "Ctrl-C stops the cluster."; \
	wait

clean:
	rm -rf $(BIN)

# End-to-end benchmark: embedded nsqd, two servers in one process, websocket
# clients in another, all on 127.0.0.1; prints one markdown table (about
# 20 s with the build). Flags via BENCH_ARGS, e.g. make bench BENCH_ARGS='-profile /tmp/prof'
# (go run ./bench -h lists them). Then the queue comparison (bench-queues,
# about 20 s), the collection comparison (bench-collections, about 10 s),
# the cluster benchmark (bench-cluster, about 2 min), then the peer, latency breakdown and many-keys phases
# (bench-peer), about 4 min more on the project's loaded 2-core machine.
# All run even if one fails; the target fails if any did. The in-process
# Go benchmarks are separate:
# go test -run xxx -bench . ./esbridge/
BENCH_ARGS ?=
.PHONY: bench
bench:
	@status=0; \
	$(GO) run ./bench $(BENCH_ARGS) || status=$$?; \
	$(MAKE) --no-print-directory bench-queues || status=$$?; \
	$(MAKE) --no-print-directory bench-collections || status=$$?; \
	$(MAKE) --no-print-directory bench-cluster || status=$$?; \
	$(MAKE) --no-print-directory bench-peer || status=$$?; \
	exit $$status

# The queue comparison alone: latency through each queue (in-process, NSQ
# embedded, and the machine's PostgreSQL 127.0.0.1:5432, NATS 127.0.0.1:4222,
# Redis 127.0.0.1:6379) and notify throughput, one markdown table (about
# 20 s). A broker that does not answer is skipped, and its row says so.
# Flags via BENCH_QUEUES_ARGS, e.g.
# make bench-queues BENCH_QUEUES_ARGS='-pg postgres://app@127.0.0.1:5432/app'
BENCH_QUEUES_ARGS ?=
.PHONY: bench-queues
bench-queues:
	$(GO) run ./bench -queues $(BENCH_QUEUES_ARGS)

# The collection comparison alone: bytes a client reads per change of one
# row of a 500-row collection (diff vs full state), and 1,000 clients
# holding it reconnecting at once without and with resume (bytes, time,
# servers CPU); one markdown table (about 10 s). Flags via
# BENCH_COLLECTIONS_ARGS, e.g. BENCH_COLLECTIONS_ARGS='-coll-rows 2000'.
BENCH_COLLECTIONS_ARGS ?=
.PHONY: bench-collections
bench-collections:
	$(GO) run ./bench -collections $(BENCH_COLLECTIONS_ARGS)

# The cluster benchmark alone: per queue (NSQ embedded, and the machine's
# NATS 127.0.0.1:4222 and Redis 127.0.0.1:6379 each broadcasting and then
# routing by key, PostgreSQL 127.0.0.1:5432), 2, 4, 8 and 16 server processes, each with 20 clients watching keys
# drawn from a Zipf distribution over 10,000 keys, the clients in one more
# process; 150 changes/s for 2 s per size. Per size: notifications
# received per server per change against the share of changes its clients
# watch, fetches and server CPU per change, visible latency; then what a
# server pays to receive a notification nobody watches, and the routed
# queues' targets. Markdown tables (about 2 min with the build). A broker that does not answer is skipped.
# Flags via BENCH_CLUSTER_ARGS, e.g.
# make bench-cluster BENCH_CLUSTER_ARGS='-cluster-queues nats,redis -cluster-n 2,4'
BENCH_CLUSTER_ARGS ?=
.PHONY: bench-cluster
bench-cluster:
	$(GO) run ./bench -cluster $(BENCH_CLUSTER_ARGS)

# The peer program alone: entity-sync, used as the seed's README does and
# through New + Register, vs Centrifuge v0.40.1 (one server, then two through
# nsqd / Redis at 127.0.0.1:6379) on one key, the seed path's latency
# breakdown at a low rate (OnRound), then many keys with a few subscribers
# each (the plain-TCP floor with -phases peer,floor); the same websocket
# clients for every system; prints markdown tables. It is its own Go module (bench/peer), so Centrifuge never
# enters the library's go.mod. Flags via BENCH_PEER_ARGS, e.g.
# make bench-peer BENCH_PEER_ARGS='-systems seed,cf -phases peer -one-server-only'
# or BENCH_PEER_ARGS='-many-keys-only -profile /tmp/prof'
# (cd bench/peer && go run . -h lists them).
BENCH_PEER_ARGS ?=
.PHONY: bench-peer
bench-peer:
	cd bench/peer && $(GO) run . $(BENCH_PEER_ARGS)

# The JavaScript client's tests: node tests against a scripted server and
# against real Go servers (clients/js/testserver), and a browser test in
# headless Chromium. Installs the npm devDependencies and Debian's chromium
# when missing (see clients/js/scripts/test.sh).
.PHONY: test-js
test-js:
	bash clients/js/scripts/test.sh

# Soak run: nsqlookupd, two nsqd, three soak servers and 500 esclient
# clients as separate processes on 127.0.0.1, writers changing random keys
# through random servers, faults injected at random times (servers and nsqd
# SIGKILLed and restarted, a server SIGSTOPped, nsqlookupd down for 20 s,
# misbehaving clients); then a quiet period and the checks, printed as
# markdown tables. Fails when a check fails. SOAK_DURATION is how long
# writes and faults go on (the whole run takes up to a minute more:
# start-up, a fault still running, the quiet period); SOAK_ARGS passes
# more flags, e.g. SOAK_ARGS='-seed 42 -logs /tmp/soak'
# (go run ./soak -h lists them).
SOAK_DURATION ?= 3m
SOAK_ARGS ?=
.PHONY: soak
soak: nsq
	$(GO) run ./soak -bin $(BIN) -duration $(SOAK_DURATION) $(SOAK_ARGS)
