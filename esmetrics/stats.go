package esmetrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esweb"
)

// snapshot is what one scrape reads of a server.
type snapshot struct {
	bridge esbridge.Stats
	web    esweb.Stats
	hasWeb bool
	ready  bool
}

// metric is one family read from a snapshot: values returns one sample per
// combination of label values, in the order of the desc's labels.
type metric struct {
	desc   *prometheus.Desc
	kind   prometheus.ValueType
	web    bool // read from esweb.Stats
	values func(*snapshot) []sample
}

type sample struct {
	v      float64
	labels []string
}

func bridgeGauge(name, help string, f func(*esbridge.Stats) int) metric {
	return metric{desc: prometheus.NewDesc(name, help, nil, nil), kind: prometheus.GaugeValue,
		values: func(s *snapshot) []sample { return []sample{{v: float64(f(&s.bridge))}} }}
}

func bridgeCounter(name, help string, f func(*esbridge.Stats) uint64) metric {
	return metric{desc: prometheus.NewDesc(name, help, nil, nil), kind: prometheus.CounterValue,
		values: func(s *snapshot) []sample { return []sample{{v: float64(f(&s.bridge))}} }}
}

func webCounter(name, help string, f func(*esweb.Stats) uint64) metric {
	return metric{desc: prometheus.NewDesc(name, help, nil, nil), kind: prometheus.CounterValue, web: true,
		values: func(s *snapshot) []sample { return []sample{{v: float64(f(&s.web))}} }}
}

// webCounterBy is a counter with one label whose values are the keys of by.
func webCounterBy(name, help, label string, by map[string]func(*esweb.Stats) uint64) metric {
	return metric{desc: prometheus.NewDesc(name, help, []string{label}, nil), kind: prometheus.CounterValue, web: true,
		values: func(s *snapshot) []sample {
			out := make([]sample, 0, len(by))
			for value, f := range by {
				out = append(out, sample{v: float64(f(&s.web)), labels: []string{value}})
			}
			return out
		}}
}

// descs is every family read at scrape time. Names and help texts are the
// documented interface (docs/operations.md lists them): change them as
// one would an API.
var descs = []metric{
	{desc: prometheus.NewDesc("entitysync_ready", "1 while the server is ready for clients (EntitySync.Ready: set up, registered, queue live, not closing), else 0.", nil, nil),
		kind: prometheus.GaugeValue, values: func(s *snapshot) []sample {
			if s.ready {
				return []sample{{v: 1}}
			}
			return []sample{{v: 0}}
		}},

	// Connections (esweb).
	{desc: prometheus.NewDesc("entitysync_connections", "Websocket connections open.", nil, nil),
		kind: prometheus.GaugeValue, web: true,
		values: func(s *snapshot) []sample { return []sample{{v: float64(s.web.Connections)}} }},
	webCounter("entitysync_connections_accepted_total", "Websocket connections upgraded.",
		func(w *esweb.Stats) uint64 { return w.Accepted }),
	webCounterBy("entitysync_connections_refused_total", "Upgrade requests refused, by reason: origin (403), auth (Authenticate: 401 or 403), full (MaxConnections: 503).", "reason",
		map[string]func(*esweb.Stats) uint64{
			"origin": func(w *esweb.Stats) uint64 { return w.RefusedOrigin },
			"auth":   func(w *esweb.Stats) uint64 { return w.RefusedAuth },
			"full":   func(w *esweb.Stats) uint64 { return w.RefusedFull },
		}),
	webCounter("entitysync_slow_clients_dropped_total", "Connections dropped for not reading: a write waited WriteWait, or updates waiting passed MaxPendingBytes.",
		func(w *esweb.Stats) uint64 { return w.SlowClients }),
	webCounterBy("entitysync_connections_closed_by_server_total", "Connections the server closed with a close code: 1002 (a frame broke the websocket protocol), 1008 (policy: request rate kept exceeded, or too far behind) or 1009 (a frame over ReadLimit).", "code",
		map[string]func(*esweb.Stats) uint64{
			"1002": func(w *esweb.Stats) uint64 { return w.ProtocolErrors },
			"1008": func(w *esweb.Stats) uint64 { return w.ProtocolViolations },
			"1009": func(w *esweb.Stats) uint64 { return w.FramesTooLarge },
		}),
	webCounter("entitysync_requests_rate_limited_total", "Client requests held back by the per-connection rate limit.",
		func(w *esweb.Stats) uint64 { return w.RateLimited }),
	webCounterBy("entitysync_subscribes_refused_total", "Subscribe requests refused, by reason: limit (MaxSubscriptions), forbidden (Authorize).", "reason",
		map[string]func(*esweb.Stats) uint64{
			"limit":     func(w *esweb.Stats) uint64 { return w.SubscriptionLimit },
			"forbidden": func(w *esweb.Stats) uint64 { return w.Forbidden },
		}),

	// Subscriptions and outbound queues (esbridge).
	bridgeGauge("entitysync_subscriptions", "Subscriptions (client, key) held by this server's clients.",
		func(b *esbridge.Stats) int { return b.Subscriptions }),
	bridgeGauge("entitysync_keys", "Keys with at least one subscriber on this server.",
		func(b *esbridge.Stats) int { return b.Keys }),
	bridgeGauge("entitysync_pending_bytes", "Bytes of updates waiting in slow clients' outbound queues (MaxPendingBytes bounds each client's).",
		func(b *esbridge.Stats) int { return b.PendingBytes }),
	bridgeCounter("entitysync_updates_coalesced_total", "Updates waiting for a slow client that a newer state of the same key replaced before they were written (latest-wins).",
		func(b *esbridge.Stats) uint64 { return b.Coalesced }),
	bridgeCounter("entitysync_deliveries_total", "Updates handed to clients: written to the socket, or queued for a slow client.",
		func(b *esbridge.Stats) uint64 { return b.Deliveries }),
	bridgeCounter("entitysync_revocations_total", "Subscriptions withdrawn because Authorize refused them again.",
		func(b *esbridge.Stats) uint64 { return b.Revocations }),

	// Notifications and the queue (esbridge).
	bridgeCounter("entitysync_notifications_published_total", "Change notifications this server published to the queue (NotifyAllOfChange, NotifyAsync).",
		func(b *esbridge.Stats) uint64 { return b.Notifications }),
	bridgeGauge("entitysync_notifications_pending", "NotifyAsync notifications waiting to be published.",
		func(b *esbridge.Stats) int { return b.Pending }),
	bridgeCounter("entitysync_notify_errors_total", "Failed attempts to publish a NotifyAsync notification (each is retried).",
		func(b *esbridge.Stats) uint64 { return b.NotifyErrors }),
	bridgeCounter("entitysync_notifications_received_total", "Change notifications received from the queue, for any key.",
		func(b *esbridge.Stats) uint64 { return b.Received }),
	bridgeCounter("entitysync_queue_losses_total", "Times the queue reported that notifications may have been lost (broker reconnect, a gap in a publisher's sequence); each re-fetches the entity type's subscribed keys.",
		func(b *esbridge.Stats) uint64 { return b.Resyncs }),
	bridgeCounter("entitysync_resync_keys_total", "Keys re-fetched after queue losses.",
		func(b *esbridge.Stats) uint64 { return b.ResyncedKeys }),

	// Fetches (esbridge).
	bridgeCounter("entitysync_fetches_total", "Calls to fetch functions.",
		func(b *esbridge.Stats) uint64 { return b.Fetches }),
	bridgeCounter("entitysync_fetch_errors_total", "Calls to fetch functions that failed (retried with backoff while the key has subscribers).",
		func(b *esbridge.Stats) uint64 { return b.FetchErrors }),
}
