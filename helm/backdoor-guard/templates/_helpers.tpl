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

{{- define "backdoor-guard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
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

{{- define "backdoor-guard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
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
  args: [serve]
  env:
    - name: GUARD_CONFIG
      value: {{ include "backdoor-guard.configPath" . }}/guard.yaml
    - name: GUARD_BUNDLE
      value: {{ .Values.bundle.mountPath }}
    - name: GUARD_HOST
      value: 0.0.0.0
    - name: GUARD_PORT
      value: {{ .Values.port | quote }}
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
  startupProbe:
    httpGet: {path: /healthz, port: http}
    {{- toYaml .Values.probes.startup | nindent 4 }}
  livenessProbe:
    httpGet: {path: /healthz, port: http}
    {{- toYaml .Values.probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet: {path: /readyz, port: http}
    {{- toYaml .Values.probes.readiness | nindent 4 }}
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
{{- end }}
