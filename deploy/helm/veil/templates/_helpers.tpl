{{/*
Names are fixed ("veil", "veil-agent", "veil-config"), not prefixed with the release name: the
agent owns each node's datapath, so a cluster runs exactly one veil, and the names are those the
shipped manifests, the lab and the docs use.
*/}}
{{- define "veil.name" -}}
veil
{{- end }}

{{- define "veil.chart" -}}
{{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable for the DaemonSet's whole life (its selector is immutable). */}}
{{- define "veil.selectorLabels" -}}
app.kubernetes.io/name: {{ include "veil.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "veil.labels" -}}
helm.sh/chart: {{ include "veil.chart" . }}
{{ include "veil.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: veil
{{- end }}

{{- define "veil.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
