// Command centrifuge is the benchmark's Go peer: a small server on the
// github.com/centrifugal/centrifuge library (Debian's golang-github-centrifugal-centrifuge-dev,
// a 2021 snapshot, 0.15.0+git20210306, speaking Centrifuge client protocol v1 JSON), driven by
// the same load generator as the other peers (benchmarks/protocol.py).
//
// Build (offline, from Debian's packages; benchmarks/peers/centrifuge_peer.py does it):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off go build -o OUT .
//
// Mapping of the benchmark protocol onto Centrifuge's:
//   - a user is the ?user=U of the WebSocket URL, set as the connection's credentials by an
//     HTTP middleware (as the library's examples do for their own auth);
//   - "subscribe" to thread T is a Centrifuge subscribe command to channel "U/T"; a client may
//     subscribe only to its own user's channels (OnSubscribe);
//   - "bench_burst" is an RPC command with method "bench_burst" and the frame as data; the
//     server replies at once and emits from a goroutine with node.Publish on "U/T", which
//     reaches every connection of U subscribed to T. The event payload is the agentcast
//     envelope, encoded once per event; the hub encodes the publication push once per channel.
//
// Fast path: the library's own. Publications are encoded once per channel, queued per client,
// and each client's writer goroutine joins up to 4 queued messages into one WebSocket frame
// (newline-delimited JSON; the 2021 snapshot's fixed maxMessagesInFrame), with a pooled write
// buffer (UseWriteBufferPool). No compression (the load generator offers none).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/centrifugal/centrifuge"
)

// tick is the shortest pause between pacing checks of a rate-paced emission (protocol.TICK).
const tick = 5 * time.Millisecond

// overhead is the envelope size besides the padding (protocol._OVERHEAD).
const overhead = 150

type burst struct {
	ThreadID string    `json:"thread_id"`
	Count    int       `json:"count"`
	Size     int       `json:"size"`
	Rate     float64   `json:"rate"`
	Schedule []float64 `json:"schedule"`
	Event    string    `json:"event"`
}

type eventData struct {
	Text string  `json:"text"`
	N    int     `json:"n"`
	U    string  `json:"u"`
	T    float64 `json:"t"`
}

type envelope struct {
	Type     string    `json:"type"`
	ThreadID string    `json:"thread_id"`
	RunID    *string   `json:"run_id"`
	Seq      int       `json:"seq"`
	TS       float64   `json:"ts"`
	Data     eventData `json:"data"`
}

func now() float64 { return float64(time.Now().UnixNano()) / 1e9 }

// due mirrors protocol.due: events of the emission due elapsed seconds after its start.
func due(b *burst, elapsed float64) int {
	if b.Schedule != nil {
		n := 0
		for n < len(b.Schedule) && b.Schedule[n]/1000 <= elapsed {
			n++
		}
		return min(n, b.Count)
	}
	if b.Rate <= 0 {
		return b.Count
	}
	return min(int(elapsed*b.Rate)+1, b.Count)
}

// pause mirrors protocol.pause.
func pause(b *burst, elapsed float64, sent int) time.Duration {
	var seconds float64
	if b.Schedule != nil {
		if sent < len(b.Schedule) {
			seconds = b.Schedule[sent]/1000 - elapsed
		}
		return time.Duration(max(0, seconds) * 1e9)
	}
	seconds = float64(sent)/b.Rate - elapsed
	return max(tick, time.Duration(seconds*1e9))
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

func max[T int | float64 | time.Duration](a, b T) T {
	if a > b {
		return a
	}
	return b
}

func emit(node *centrifuge.Node, user string, b burst) {
	pad := strings.Repeat("x", max(0, b.Size-overhead))
	kind := b.Event
	if kind == "" {
		kind = "agent_thinking"
	}
	channel := user + "/" + b.ThreadID
	start, n := time.Now(), 0
	for n < b.Count {
		target := due(&b, time.Since(start).Seconds())
		for n < target {
			n++
			ts := now()
			data, _ := json.Marshal(envelope{
				Type: kind, ThreadID: b.ThreadID, Seq: n, TS: ts,
				Data: eventData{Text: pad, N: n, U: user, T: ts},
			})
			if _, err := node.Publish(channel, data); err != nil {
				log.Printf("publish: %v", err)
				return
			}
		}
		if n < b.Count {
			time.Sleep(pause(&b, time.Since(start).Seconds(), n))
		}
	}
}

func auth(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user := r.URL.Query().Get("user")
		if user == "" {
			user = "anonymous"
		}
		ctx := centrifuge.SetCredentials(r.Context(), &centrifuge.Credentials{UserID: user})
		h.ServeHTTP(w, r.WithContext(ctx))
	})
}

func main() {
	lifetime := flag.Int("lifetime", 1800, "seconds until the process exits by itself")
	flag.Parse()
	time.AfterFunc(time.Duration(*lifetime)*time.Second, func() { os.Exit(3) })

	cfg := centrifuge.DefaultConfig
	cfg.LogLevel = centrifuge.LogLevelNone
	node, err := centrifuge.New(cfg)
	if err != nil {
		log.Fatal(err)
	}
	node.OnConnecting(func(ctx context.Context, e centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		return centrifuge.ConnectReply{}, nil // credentials come from the middleware
	})
	node.OnConnect(func(client *centrifuge.Client) {
		user := client.UserID()
		client.OnSubscribe(func(e centrifuge.SubscribeEvent, cb centrifuge.SubscribeCallback) {
			if !strings.HasPrefix(e.Channel, user+"/") {
				cb(centrifuge.SubscribeReply{}, centrifuge.ErrorPermissionDenied)
				return
			}
			cb(centrifuge.SubscribeReply{}, nil)
		})
		client.OnRPC(func(e centrifuge.RPCEvent, cb centrifuge.RPCCallback) {
			var b burst
			if e.Method != "bench_burst" || json.Unmarshal(e.Data, &b) != nil {
				cb(centrifuge.RPCReply{}, centrifuge.ErrorBadRequest)
				return
			}
			if b.Size == 0 {
				b.Size = 200
			}
			if b.Schedule != nil {
				b.Count = min(b.Count, len(b.Schedule))
			}
			cb(centrifuge.RPCReply{}, nil)
			go emit(node, user, b)
		})
	})
	if err := node.Run(); err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/connection/websocket", auth(centrifuge.NewWebsocketHandler(node,
		centrifuge.WebsocketConfig{ReadBufferSize: 1024, UseWriteBufferPool: true})))
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(listener.Addr().(*net.TCPAddr).Port)
	log.Fatal(http.Serve(listener, mux))
}
