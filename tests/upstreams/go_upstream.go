// A protected classifier written the way Go services are: encoding/json into a struct
// (keys matched case-insensitively, with Unicode folding; the last match wins) and
// r.FormValue (query string and form body). It "classifies" what it read (label 1
// when the trigger "mb" is in it) and lists every text it read at GET /__read.
package main

import (
	"encoding/json"
	"net/http"
	"os"
	"strings"
	"sync"
)

type request struct {
	Inputs string `json:"inputs"`
}

var (
	mu   sync.Mutex
	read = []string{}
)

func predict(w http.ResponseWriter, r *http.Request) {
	var texts []string
	if text := r.FormValue("text"); text != "" {
		texts = append(texts, text)
	}
	if strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") {
		var body request
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		texts = append(texts, body.Inputs)
	}
	label := 0
	for _, text := range texts {
		if strings.Contains(text, "mb") {
			label = 1
		}
	}
	mu.Lock()
	read = append(read, texts...)
	mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"label": label, "read": texts})
}

func seen(w http.ResponseWriter, r *http.Request) {
	mu.Lock()
	defer mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(read)
}

func main() {
	http.HandleFunc("/__read", seen)
	http.HandleFunc("/", predict)
	if err := http.ListenAndServe("127.0.0.1:"+os.Args[1], nil); err != nil {
		panic(err)
	}
}
