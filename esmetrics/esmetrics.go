// Package esmetrics exports an entity-sync server's metrics to Prometheus.
// It is the only library package that imports the Prometheus client:
// an application that does not use it does not link it.
//
// Two calls wire it, because the latency histograms are fed by the bridge's
// round hook, which is fixed when the server is built:
//
//	cfg := entitysync.Config{ /* ... */ }
//	m := esmetrics.Instrument(&cfg) // before entitysync.New or Setup
//	es, err := entitysync.New(cfg)
//	// ...
//	err = m.Register(prometheus.DefaultRegisterer, es)
//
// Counters and gauges are read from the server's own statistics
// (esbridge.Stats, esweb.Stats, EntitySync.Ready) when Prometheus scrapes,
// so they cost nothing between scrapes; a scrape costs a lock per
// subscribed key and per connection. Every name starts with entitysync_;
// labels take a few fixed values only (a refusal's reason, a close code),
// never a key, an entity type or a client.
//
// To export several servers of one process on one registry, register each
// through prometheus.WrapRegistererWith with a label that tells them apart.
package esmetrics

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
)

// latencyBuckets spans 100 µs (a fetch from memory, a fan-out to a few
// clients) to 10 s (FetchTimeout's default), about 2.5x apart.
var latencyBuckets = []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

// Metrics is one server's metrics: a prometheus.Collector.
type Metrics struct {
	es *entitysync.EntitySync // set by Register

	fetch, fanOut, notification prometheus.Histogram
}

// Instrument returns the metrics of the server that config will build, and
// installs in config.Bridge.OnRound the hook that feeds their latency
// histograms. A hook already set there is kept and called after it, with
// the same Round. Call Register once the server is built.
func Instrument(config *entitysync.Config) *Metrics {
	m := &Metrics{
		fetch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "entitysync_fetch_duration_seconds",
			Help:    "Time each fetch round spent in the fetch function: one call, or one per distinct secret for secret-taking handlers.",
			Buckets: latencyBuckets,
		}),
		fanOut: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "entitysync_fanout_duration_seconds",
			Help:    "Time from a fetch round's result to every local subscriber being handed it (written, or queued for a slow client); rounds that delivered something.",
			Buckets: latencyBuckets,
		}),
		notification: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "entitysync_notification_latency_seconds",
			Help:    "Time from a change notification's arrival from the queue to every local subscriber being handed the state it caused (fetch and fan-out included; the queue's own transit is not).",
			Buckets: latencyBuckets,
		}),
	}
	user := config.Bridge.OnRound
	config.Bridge.OnRound = func(r esbridge.Round) {
		m.observe(r)
		if user != nil {
			user(r)
		}
	}
	return m
}

// observe feeds the histograms with one round.
func (m *Metrics) observe(r esbridge.Round) {
	if r.Fetches > 0 {
		m.fetch.Observe(r.Fetched.Sub(r.Started).Seconds())
	}
	if r.Deliveries == 0 {
		return // nothing changed for anyone: no fan-out to time
	}
	m.fanOut.Observe(r.Delivered.Sub(r.Fetched).Seconds())
	if !r.Notified.IsZero() {
		m.notification.Observe(r.Delivered.Sub(r.Notified).Seconds())
	}
}

// Register registers the metrics on reg, reading counters and gauges from
// es at every scrape. es should be the server built from the configuration
// given to Instrument; another one's histograms stay empty. A server whose
// Setup failed exports entitysync_ready 0 and its bridge's counters.
func (m *Metrics) Register(reg prometheus.Registerer, es *entitysync.EntitySync) error {
	if es == nil {
		return errors.New("esmetrics: Register: nil EntitySync")
	}
	if m.es != nil {
		return errors.New("esmetrics: Register: these metrics are already registered (call Instrument once per server)")
	}
	m.es = es
	if err := reg.Register(m); err != nil {
		m.es = nil
		return err
	}
	return nil
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range descs {
		ch <- d.desc
	}
	m.fetch.Describe(ch)
	m.fanOut.Describe(ch)
	m.notification.Describe(ch)
}

// Collect implements prometheus.Collector: it reads the server's
// statistics once per scrape.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	s := snapshot{bridge: m.es.Bridge.Stats(), ready: m.es.Ready() == nil}
	if m.es.Web != nil { // nil after a failed Setup
		s.web, s.hasWeb = m.es.Web.Stats(), true
	}
	for _, d := range descs {
		if d.web && !s.hasWeb {
			continue
		}
		for _, v := range d.values(&s) {
			ch <- prometheus.MustNewConstMetric(d.desc, d.kind, v.v, v.labels...)
		}
	}
	m.fetch.Collect(ch)
	m.fanOut.Collect(ch)
	m.notification.Collect(ch)
}
