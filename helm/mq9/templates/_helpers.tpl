{{/* Chart name. */}}
{{- define "mq9.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-mq9, or the release name when it already contains the chart name.
Kept to 52 characters: StatefulSet pods add "-<ordinal>" and a controller-revision hash label. */}}
{{- define "mq9.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The headless Service: peers' DNS names and cluster ports. */}}
{{- define "mq9.headless" -}}
{{- printf "%s-headless" (include "mq9.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mq9.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mq9.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mq9.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mq9.labels" -}}
helm.sh/chart: {{ include "mq9.chart" . }}
{{ include "mq9.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mq9.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Ports between nodes: Raft (cluster port), shard i (+1+i), gateway j (+1+shards+j). */}}
{{- define "mq9.clusterPorts" -}}
{{- $base := int .Values.mq9.clusterPort }}
{{- $shards := int .Values.mq9.shards }}
- name: cluster
  port: {{ $base }}
{{- range $i, $_ := until $shards }}
- name: shard-{{ $i }}
  port: {{ add $base 1 $i }}
{{- end }}
{{- range $j, $_ := until (int $.Values.mq9.gateways) }}
- name: gateway-{{ $j }}
  port: {{ add $base 1 $shards $j }}
{{- end }}
{{- end }}

{{/* The Secret holding the cluster secret: the user's, or the one the chart makes. */}}
{{- define "mq9.clusterSecretName" -}}
{{- .Values.mq9.clusterSecret.existingSecret | default (printf "%s-cluster" (include "mq9.fullname" .)) }}
{{- end }}

{{/* Seconds the preStop hook waits for a lame-duck stop. mq9 (like nats-server) counts the
grace period inside the duration; adding both, plus a few seconds, stays on the safe side
whichever way a release counts. The node ends the hook by exiting when it is done. */}}
{{- define "mq9.lameDuckSeconds" -}}
{{- add (int .Values.lameDuck.gracePeriodSeconds) (int .Values.lameDuck.durationSeconds) 5 }}
{{- end }}

{{/* Settings mq9 would refuse at start, or a pod the kubelet would kill mid-stop: refused
here, when the chart is rendered, with the value to change. */}}
{{- define "mq9.checkValues" -}}
{{- if and .Values.tls.verify (not .Values.tls.caKey) }}
{{- fail "tls.verify needs tls.caKey (the CA that signs client certificates)" }}
{{- end }}
{{- if and .Values.tls.verify (not .Values.tls.enabled) }}
{{- fail "tls.verify needs tls.enabled" }}
{{- end }}
{{- if and .Values.lameDuck.enabled (ge (int .Values.lameDuck.gracePeriodSeconds) (int .Values.lameDuck.durationSeconds)) }}
{{- fail "lameDuck.gracePeriodSeconds must be less than lameDuck.durationSeconds (the grace period is the start of the duration; mq9 refuses it, as nats-server does)" }}
{{- end }}
{{- $stop := int .Values.shutdownSeconds }}
{{- if .Values.lameDuck.enabled }}
{{- $stop = add $stop (include "mq9.lameDuckSeconds" . | int) }}
{{- else }}
{{- $stop = add $stop (int .Values.preStopSleepSeconds) }}
{{- end }}
{{- if le (int .Values.terminationGracePeriodSeconds) $stop }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed %d: the preStop hook (lame duck or sleep) plus shutdownSeconds" (int .Values.terminationGracePeriodSeconds) $stop) }}
{{- end }}
{{- end }}
