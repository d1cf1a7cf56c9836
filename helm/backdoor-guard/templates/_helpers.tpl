{{/* Names and labels, as `helm create` makes them. */}}
{{- define "backdoor-guard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "backdoor-guard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "backdoor-guard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "backdoor-guard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "backdoor-guard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The `helm test` pod's labels: the release's, but NOT the pods' selector labels, so neither the
Service nor the PodDisruptionBudget selects it; the NetworkPolicy lets it in by these. */}}
{{- define "backdoor-guard.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "backdoor-guard.name" . | trunc 58 | trimSuffix "-" }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "backdoor-guard.labels" -}}
helm.sh/chart: {{ include "backdoor-guard.chart" . }}
{{ include "backdoor-guard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.topology }}
{{- end }}

{{- define "backdoor-guard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "backdoor-guard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when image.digest is set (a tag can be moved, a digest cannot). */}}
{{- define "backdoor-guard.image" -}}
{{- if .Values.image.digest }}
{{- .Values.image.repository }}@{{ .Values.image.digest }}
{{- else }}
{{- .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{- define "backdoor-guard.bundleImage" -}}
{{- $image := .Values.bundle.image }}
{{- $repository := required "bundle.image.repository is required with bundle.source=image" $image.repository }}
{{- if $image.digest }}
{{- $repository }}@{{ $image.digest }}
{{- else }}
{{- $repository }}:{{ required "bundle.image.tag (or .digest) is required with bundle.source=image" $image.tag }}
{{- end }}
{{- end }}

{{/* Where the url and image writers mount the bundle volume: NOT the image's own bundle path,
which an emptyDir mounted on top of it would hide. */}}
{{- define "backdoor-guard.bundleOut" -}}
/guard-bundle-out
{{- end }}

{{/* Seconds the guard takes to drain after SIGTERM: GRACEFUL_SHUTDOWN_S in guard/server.py. */}}
{{- define "backdoor-guard.drainSeconds" -}}
30
{{- end }}

{{/* Sidecar: how long your classifier keeps serving after the pod starts terminating; it must
outlive the guard's preStop delay and drain, or requests the guard already accepted find it gone. */}}
{{- define "backdoor-guard.classifierPreStopSeconds" -}}
{{- $given := .Values.shutdown.classifierPreStopSleepSeconds }}
{{- if kindIs "invalid" $given }}
{{- add .Values.shutdown.preStopSleepSeconds (include "backdoor-guard.drainSeconds" .) }}
{{- else }}
{{- $given }}
{{- end }}
{{- end }}

{{/* The shortest grace period that lets every container finish: standalone, the guard's preStop
delay + its drain; sidecar, the classifier's delay + its own drain (bounded by the guard's
upstream timeout) + the guard's delay (a native sidecar stops after the classifier). */}}
{{- define "backdoor-guard.minGracePeriod" -}}
{{- $preStop := int .Values.shutdown.preStopSleepSeconds }}
{{- if eq .Values.topology "sidecar" }}
{{- $upstream := int (ceil (.Values.settings.upstream_timeout_s | default 30)) }}
{{- add (include "backdoor-guard.classifierPreStopSeconds" . | int) $upstream $preStop 5 }}
{{- else }}
{{- add $preStop (include "backdoor-guard.drainSeconds" . | int) 5 }}
{{- end }}
{{- end }}

{{- define "backdoor-guard.gracePeriod" -}}
{{- $min := include "backdoor-guard.minGracePeriod" . | int }}
{{- $given := .Values.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $given }}
{{- $min }}
{{- else if lt (int $given) $min }}
{{- fail (printf "terminationGracePeriodSeconds (%d) is shorter than the preStop delay + drain + upstream timeout (%d): in-flight requests would be killed" (int $given) $min) }}
{{- else }}
{{- $given }}
{{- end }}
{{- end }}

{{/* NetworkPolicy: on by default in the sidecar topology (the classifier's port must not be
reachable around the guard), off by default in standalone. */}}
{{- define "backdoor-guard.networkPolicy" -}}
{{- $enabled := .Values.networkPolicy.enabled }}
{{- if kindIs "invalid" $enabled }}{{ if eq .Values.topology "sidecar" }}true{{ end }}
{{- else if $enabled }}true{{ end }}
{{- end }}

{{/* Pod-level securityContext: applies to every container of the pod, so in the sidecar
topology it is only what you set (sidecar.podSecurityContext), never imposed on your classifier. */}}
{{- define "backdoor-guard.podSecurityContext" -}}
{{- if eq .Values.topology "sidecar" }}
{{- toYaml .Values.sidecar.podSecurityContext }}
{{- else }}
{{- toYaml .Values.podSecurityContext }}
{{- end }}
{{- end }}

{{/* The API key's content (or, for an existing Secret, what the cluster holds at install/upgrade
time), hashed into a pod annotation: rotating the key rolls the pods. */}}
{{- define "backdoor-guard.apiKeyChecksum" -}}
{{- if .Values.apiKey.existingSecret }}
{{- $secret := lookup "v1" "Secret" .Release.Namespace .Values.apiKey.existingSecret }}
{{- printf "%s/%v" .Values.apiKey.existingSecret (dig "data" .Values.apiKey.existingSecretKey "" $secret) | sha256sum }}
{{- else }}
{{- .Values.apiKey.value | sha256sum }}
{{- end }}
{{- end }}

{{- define "backdoor-guard.initResources" -}}
{{- toYaml .Values.initContainers.resources }}
{{- end }}

{{/* The fetch/copy container also requests the ephemeral storage of the volume it fills. */}}
{{- define "backdoor-guard.writerResources" -}}
{{- $resources := deepCopy .Values.initContainers.resources }}
{{- $requests := merge (dict "ephemeral-storage" .Values.bundle.sizeLimit) ($resources.requests | default dict) }}
{{- toYaml (set $resources "requests" $requests) }}
{{- end }}

{{/* The API key's Secret, or "" when there is no key. */}}
{{- define "backdoor-guard.apiKeySecret" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- include "backdoor-guard.fullname" . }}
{{- end }}
{{- end }}

{{/* Native sidecars (restartable init containers) are on by default from Kubernetes 1.29. */}}
{{- define "backdoor-guard.nativeSidecar" -}}
{{- if and (eq .Values.topology "sidecar") (semverCompare ">=1.29-0" .Capabilities.KubeVersion.Version) }}true{{ end }}
{{- end }}

{{- define "backdoor-guard.configPath" -}}
/etc/backdoor-guard
{{- end }}

{{/* The guard container; in a native sidecar it also carries restartPolicy: Always. */}}
{{- define "backdoor-guard.guardContainer" -}}
- name: guard
  image: {{ include "backdoor-guard.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if include "backdoor-guard.nativeSidecar" . }}
  restartPolicy: Always
  {{- end }}
  args:
    - serve
    {{- with .Values.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    - name: GUARD_CONFIG
      value: {{ include "backdoor-guard.configPath" . }}/guard.yaml
    - name: GUARD_BUNDLE
      value: {{ .Values.bundle.mountPath }}
    - name: GUARD_HOST
      value: 0.0.0.0
    - name: GUARD_PORT
      value: {{ .Values.port | quote }}
    {{- with .Values.metricsPort }}
    {{- if or (eq (int .) (int $.Values.port)) (and (eq $.Values.topology "sidecar") (eq (int .) (int $.Values.sidecar.upstreamPort))) }}
    {{- fail (printf "metricsPort %d is also the guard's port or the classifier's (sidecar.upstreamPort): pick another, or null for /metrics on port" (int .)) }}
    {{- end }}
    - name: GUARD_METRICS_PORT
      value: {{ . | quote }}
    {{- end }}
    {{- if eq .Values.topology "sidecar" }}
    - name: GUARD_UPSTREAM
      value: http://127.0.0.1:{{ .Values.sidecar.upstreamPort }}
    {{- end }}
    {{- with include "backdoor-guard.apiKeySecret" . }}
    - name: GUARD_API_KEY
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ if $.Values.apiKey.existingSecret }}{{ $.Values.apiKey.existingSecretKey }}{{ else }}api-key{{ end }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: http
      containerPort: {{ .Values.port }}
      protocol: TCP
    {{- with .Values.metricsPort }}
    - name: metrics
      containerPort: {{ . }}
      protocol: TCP
    {{- end }}
  startupProbe:
    httpGet: {path: /healthz, port: http}
    {{- toYaml .Values.probes.startup | nindent 4 }}
  livenessProbe:
    httpGet: {path: /healthz, port: http}
    {{- toYaml .Values.probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet: {path: /readyz, port: http}
    {{- toYaml .Values.probes.readiness | nindent 4 }}
  lifecycle:
    {{- if .Values.lifecycle }}
    {{- toYaml .Values.lifecycle | nindent 4 }}
    {{- else }}
    # Keep serving while the endpoints controller and load balancers stop routing here;
    # SIGTERM (and the drain) comes after. The image has coreutils' sleep.
    preStop:
      exec:
        command: [sleep, {{ .Values.shutdown.preStopSleepSeconds | quote }}]
    {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: bundle
      mountPath: {{ .Values.bundle.mountPath }}
      readOnly: true
      {{- if and (eq .Values.bundle.source "pvc") .Values.bundle.pvc.subPath }}
      subPath: {{ .Values.bundle.pvc.subPath }}
      {{- end }}
    - name: config
      mountPath: {{ include "backdoor-guard.configPath" . }}
      readOnly: true
    - name: tmp
      mountPath: /tmp
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* Your classifier container as given; only a preStop delay is added when it has no preStop of
its own, so it outlives the guard's drain (the sleep action needs Kubernetes 1.30+; before,
an exec of `sleep`, which your image must have). */}}
{{- define "backdoor-guard.classifierContainer" -}}
{{- $classifier := deepCopy .Values.sidecar.classifier }}
{{- $_ := required "sidecar.classifier (a container spec with at least an image) is required with topology=sidecar" $classifier.image }}
{{- $_ := set $classifier "name" ($classifier.name | default "classifier") }}
{{- $seconds := include "backdoor-guard.classifierPreStopSeconds" . | int }}
{{- if and (gt $seconds 0) (not (dig "lifecycle" "preStop" "" $classifier)) }}
{{- $preStop := dict "exec" (dict "command" (list "sleep" (toString $seconds))) }}
{{- if semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version }}
{{- $preStop = dict "sleep" (dict "seconds" $seconds) }}
{{- end }}
{{- $lifecycle := merge (dict "preStop" $preStop) ($classifier.lifecycle | default dict) }}
{{- $_ := set $classifier "lifecycle" $lifecycle }}
{{- end }}
- {{- toYaml $classifier | nindent 2 }}
{{- end }}

{{/* A CPU HPA's utilisation is usage / request: the chart refuses one that cannot be computed.
Sidecar topology: on the guard container's own CPU (ContainerResource, on by default from
Kubernetes 1.27); before 1.27 on the pod's, which needs a CPU request on your classifier too.
A limit alone counts (Kubernetes then sets the request to it). "true" when ContainerResource. */}}
{{- define "backdoor-guard.hpaOnGuardContainer" -}}
{{- if not (or (dig "requests" "cpu" "" .Values.resources) (dig "limits" "cpu" "" .Values.resources)) }}
{{- fail "autoscaling.metric=cpu needs resources.requests.cpu (CPU utilisation is usage / request), or use autoscaling.metric=pendingRequests" }}
{{- end }}
{{- if eq .Values.topology "sidecar" }}
{{- if semverCompare ">=1.27-0" .Capabilities.KubeVersion.Version }}true
{{- else }}
{{- $classifier := .Values.sidecar.classifier.resources | default dict }}
{{- if not (or (dig "requests" "cpu" "" $classifier) (dig "limits" "cpu" "" $classifier)) }}
{{- fail "autoscaling.metric=cpu before Kubernetes 1.27 scales on the pod's CPU utilisation, which needs a CPU request on sidecar.classifier too (resources.requests.cpu), or use autoscaling.metric=pendingRequests" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
